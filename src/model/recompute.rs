//! Gradient checkpointing (`use_gradient_checkpointing`, PyTorch's `torch.utils.checkpoint`):
//! a checkpointed segment of the forward pass keeps only its inputs; its intermediates are freed
//! as soon as its output exists, and the backward pass recomputes them one segment at a time.
//!
//! candle has no such thing, so [`Recompute`] runs the backward pass itself:
//! 1. the ordinary backward pass from the loss, which stops at each segment's output (a leaf);
//! 2. for each segment, last first: recompute it from its inputs, and backpropagate the output's
//!    gradient `g` through it (the gradient of `<y, g>`), adding what it gives to the store;
//! 3. a segment input that came from the ordinary graph (not from another segment) was cut off
//!    from it by a leaf copy; its gradient is sent back through that graph (the gradient of
//!    `<source, g>`) before any earlier segment is processed.
//!
//! Peak memory is then one segment's intermediates plus the inputs every segment keeps, instead
//! of every intermediate of the whole pass. The gradients are the same up to the order in which
//! floating-point contributions are added.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId, Var};

type SegmentFn<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

struct Segment<'a> {
    inputs: Vec<Tensor>,
    output: Var,
    f: SegmentFn<'a>,
}

/// A segment input cut from the ordinary graph: its source, its leaf copy, and the number of
/// segments recorded before it (its source can depend on those only; every segment using it
/// comes after).
struct Cut {
    source: Tensor,
    leaf: Var,
    after: usize,
}

#[derive(Default)]
struct Tape<'a> {
    segments: Vec<Segment<'a>>,
    /// Leaf copies of ordinary-graph tensors that segments take as inputs.
    cuts: Vec<Cut>,
    /// A source tensor's leaf copy, so a tensor several segments use is cut once.
    leaf_of: HashMap<TensorId, usize>,
}

/// Records the checkpointed segments of one forward pass and runs its backward pass.
pub struct Recompute<'a> {
    enabled: bool,
    tape: RefCell<Tape<'a>>,
}

impl<'a> Recompute<'a> {
    /// Checkpointing on: [`Recompute::segment`] keeps only inputs.
    pub fn on() -> Self {
        Self {
            enabled: true,
            tape: RefCell::default(),
        }
    }

    /// Checkpointing off: segments run as ordinary code.
    pub fn off() -> Self {
        Self {
            enabled: false,
            tape: RefCell::default(),
        }
    }

    /// `on()` or `off()`.
    pub fn new(enabled: bool) -> Self {
        if enabled {
            Self::on()
        } else {
            Self::off()
        }
    }

    /// `f(inputs)`, as a checkpointed segment when enabled: the result is a leaf whose
    /// gradient [`Recompute::backward`] carries back through a recomputation of `f`. `f` must
    /// compute the same thing each time it is called (no fresh randomness).
    pub fn segment(
        &self,
        inputs: &[&Tensor],
        f: impl Fn(&[Tensor]) -> Result<Tensor> + 'a,
    ) -> Result<Tensor> {
        if !self.enabled {
            let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
            return f(&owned);
        }
        let mut tape = self.tape.borrow_mut();
        let mut leaves = Vec::with_capacity(inputs.len());
        for t in inputs {
            let leaf = if t.is_variable() || !t.track_op() {
                // Another segment's output (or a parameter), or a tensor needing no gradient.
                (*t).clone()
            } else if let Some(&i) = tape.leaf_of.get(&t.id()) {
                tape.cuts[i].leaf.as_tensor().clone()
            } else {
                let leaf = Var::from_tensor(&t.detach())?;
                let n = tape.cuts.len();
                tape.leaf_of.insert(t.id(), n);
                let after = tape.segments.len();
                tape.cuts.push(Cut {
                    source: (*t).clone(),
                    leaf: leaf.clone(),
                    after,
                });
                leaf.as_tensor().clone()
            };
            leaves.push(leaf);
        }
        // The forward pass's graph lives only until the output is copied into a leaf.
        let output = Var::from_tensor(&f(&leaves)?.detach())?;
        let out = output.as_tensor().clone();
        tape.segments.push(Segment {
            inputs: leaves,
            output,
            f: Box::new(f),
        });
        Ok(out)
    }

    /// The gradients of `loss` with respect to every variable it depends on, through the
    /// checkpointed segments (see the module docs). Consumes the recorded segments.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let mut grads = loss.backward()?;
        let tape = std::mem::take(&mut *self.tape.borrow_mut());
        let mut routed = vec![false; tape.cuts.len()];
        for (j, seg) in tape.segments.iter().enumerate().rev() {
            // Leaf copies made after this segment have all their users processed: their
            // gradients flow back first, as they can reach this segment's output.
            route(&tape.cuts, j + 1, &mut routed, &mut grads)?;
            let Some(g) = grads.remove(seg.output.as_tensor()) else {
                continue;
            };
            let y = (seg.f)(&seg.inputs)?;
            // Gradients can carry a graph of their own (candle computes a variable's gradient
            // from the variables around it): cut it, or this pass would differentiate it too.
            let sub = (y * g.detach())?.sum_all()?.backward()?;
            grads.extend(sub)?;
        }
        route(&tape.cuts, 0, &mut routed, &mut grads)?;
        Ok(grads)
    }
}

/// Sends the gradients of the leaf copies made after `from` segments back through their
/// sources' graph (one backward pass for all of them), once each.
fn route(cuts: &[Cut], from: usize, routed: &mut [bool], grads: &mut GradStore) -> Result<()> {
    let mut total: Option<Tensor> = None;
    for (i, cut) in cuts.iter().enumerate() {
        if routed[i] || cut.after < from {
            continue;
        }
        routed[i] = true;
        if let Some(g) = grads.remove(cut.leaf.as_tensor()) {
            let dot = (&cut.source * g.detach())?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + dot)?,
                None => dot,
            });
        }
    }
    if let Some(t) = total {
        grads.extend(t.backward()?)?;
    }
    Ok(())
}
