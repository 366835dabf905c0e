//! A restored checkpoint's loop state checked in its own terms before any of it is used: every
//! count within what the run can have reached, every hyper-parameter in the domain the
//! configuration allows and representable in the training dtype, every learning rate finite and
//! non-negative. `state.json` is a file a user can edit; an error names it, the key's path in
//! it and the value.

use std::fmt::Display;
use std::path::Path;

use anyhow::{anyhow, Result};

use super::state::LoopState;
use crate::config::limits::{dtype_problem, MAX_KL_BETA, MAX_STEPS};
use crate::config::Precision;
use crate::train::adaptive::RollingMean;
use crate::train::schedule::ScheduleError;
use crate::train::step::{StepConfig, TrainerState};

/// The longest loss history a rolling mean may keep (the reference's windows hold 100).
const MAX_WINDOW: usize = 1_000_000;

/// Names the file in every error.
struct At<'a> {
    file: &'a Path,
}

impl At<'_> {
    fn bad(&self, key: &str, value: impl Display, why: impl Display) -> anyhow::Error {
        anyhow!("{}: {key} is {value}: {why}", self.file.display())
    }

    /// `value` must satisfy `ok`; else an error saying what it must be.
    fn expect(&self, key: &str, value: f64, ok: bool, expected: &str) -> Result<()> {
        if ok {
            Ok(())
        } else {
            Err(self.bad(key, value, format!("must be {expected}")))
        }
    }

    fn non_negative(&self, key: &str, value: f64) -> Result<()> {
        self.expect(
            key,
            value,
            value.is_finite() && value >= 0.0,
            "finite and >= 0",
        )
    }

    fn count_at_most(&self, key: &str, value: u64, most: u64, what: &str) -> Result<()> {
        if value <= most {
            Ok(())
        } else {
            Err(self.bad(key, value, format!("more than {what} ({most})")))
        }
    }

    /// A value the step computes with in `dtype` must be a number there.
    fn in_dtype(&self, key: &str, value: f64, dtype: Precision) -> Result<()> {
        match dtype_problem(value, dtype) {
            Some(why) => Err(self.bad(key, format!("{value:e}"), why)),
            None => Ok(()),
        }
    }

    fn rolling_mean(&self, key: &str, m: &RollingMean) -> Result<()> {
        let cap = m.capacity;
        if cap == 0 || cap > MAX_WINDOW {
            return Err(self.bad(
                &format!("{key}.capacity"),
                cap,
                format!("must be between 1 and {MAX_WINDOW}"),
            ));
        }
        if m.items.len() > cap {
            return Err(self.bad(
                &format!("{key}.items"),
                format!("a list of {}", m.items.len()),
                format!("holds more than its capacity {cap}"),
            ));
        }
        if let Some((i, v)) = m.items.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(self.bad(&format!("{key}.items[{i}]"), v, "a loss must be finite"));
        }
        Ok(())
    }
}

/// Checks `state`, read from `file`, for a run computing in `dtype`.
pub(super) fn check_loop_state(state: &LoopState, dtype: Precision, file: &Path) -> Result<()> {
    let at = At { file };
    let step = state.global_step;
    if state.total_steps == 0 || state.total_steps > MAX_STEPS {
        return Err(at.bad(
            "loop.total_steps",
            state.total_steps,
            format!("a run has between 1 and {MAX_STEPS} steps"),
        ));
    }
    if state.steps_per_epoch == 0 || state.steps_per_epoch > MAX_STEPS {
        return Err(at.bad(
            "loop.steps_per_epoch",
            state.steps_per_epoch,
            format!("an epoch has between 1 and {MAX_STEPS} steps"),
        ));
    }
    // Every epoch the sampler finished held at least one trained step.
    at.count_at_most(
        "loop.sampler.epoch",
        state.sampler.epoch,
        step.saturating_add(1),
        &format!("the epochs {step} trained steps can have reached"),
    )?;
    at.count_at_most(
        "loop.sampler.position",
        state.sampler.position as u64,
        state.steps_per_epoch,
        "the batches of an epoch (loop.steps_per_epoch)",
    )?;
    // Counters that only ever grow by one: bounded where counting on would overflow.
    at.count_at_most(
        "loop.checkpoints_written",
        state.checkpoints_written,
        MAX_STEPS,
        "the most steps a run may have",
    )?;
    for (key, s) in [
        ("loop.last_sample_step", state.last_sample_step),
        ("loop.last_eval_step", state.last_eval_step),
    ] {
        if let Some(s) = s {
            at.count_at_most(key, s, step, "the checkpoint's step (loop.global_step)")?;
        }
    }
    at.non_negative("loop.elapsed_secs", state.elapsed_secs)?;
    at.rolling_mean("loop.vae_avg", &state.vae_avg)?;
    at.rolling_mean("loop.kl_avg", &state.kl_avg)?;
    for (name, trainer) in &state.trainers {
        check_trainer(&at, &format!("loop.trainers.{name}"), name, trainer, dtype)?;
    }
    Ok(())
}

fn check_trainer(
    at: &At,
    key: &str,
    model: &str,
    t: &TrainerState,
    dtype: Precision,
) -> Result<()> {
    check_step_config(at, &format!("{key}.config"), &t.config, dtype)?;
    at.rolling_mean(&format!("{key}.adaptive.recon"), &t.adaptive.recon)?;
    at.rolling_mean(&format!("{key}.adaptive.kl"), &t.adaptive.kl)?;
    let o = &t.optimizer;
    let lr_key = format!("{key}.optimizer.lr");
    at.non_negative(&lr_key, o.lr)?;
    at.in_dtype(&lr_key, o.lr, dtype)?;
    o.spec
        .validate(model)
        .map_err(|e| anyhow!("{}: {key}.optimizer.spec: {e}", at.file.display()))?;
    at.in_dtype(&format!("{key}.optimizer.spec.lr"), o.spec.lr(), dtype)?;
    for (param, n) in &o.steps {
        at.count_at_most(
            &format!("{key}.optimizer.steps.{param}"),
            *n,
            MAX_STEPS,
            "the most steps a run may have",
        )?;
    }
    let sched = format!("{key}.scheduler");
    t.scheduler.check_state(model).map_err(|e| match e {
        ScheduleError::InvalidParameter {
            field,
            expected,
            value,
            ..
        } => at.bad(
            &format!("{sched}.{field}"),
            value,
            format!("must be {expected}"),
        ),
        other => anyhow!("{}: {sched}: {other}", at.file.display()),
    })?;
    for (field, v) in t.scheduler.learning_rates() {
        at.in_dtype(&format!("{sched}.{field}"), v, dtype)?;
    }
    for (k, n) in [
        (format!("{sched}.last_epoch"), t.scheduler.last_epoch()),
        (format!("{key}.skipped"), t.skipped),
    ] {
        at.count_at_most(&k, n, MAX_STEPS, "the most steps a run may have")?;
    }
    if let Some(s) = &t.loss_scaler {
        let k = |f: &str| format!("{key}.loss_scaler.{f}");
        at.expect(
            &k("scale"),
            s.scale,
            s.scale.is_finite() && s.scale > 0.0,
            "finite and > 0",
        )?;
        at.in_dtype(&k("scale"), s.scale, dtype)?;
        let growth = s.growth_factor;
        at.expect(
            &k("growth_factor"),
            growth,
            growth.is_finite() && growth >= 1.0,
            ">= 1",
        )?;
        let back = s.backoff_factor;
        at.expect(
            &k("backoff_factor"),
            back,
            back > 0.0 && back <= 1.0,
            "in (0, 1]",
        )?;
        let every = s.growth_interval as f64;
        at.expect(&k("growth_interval"), every, s.growth_interval > 0, "> 0")?;
    }
    Ok(())
}

/// The loss and EMA settings the step runs with: the configuration's domains
/// (`Config::validate`), in the training dtype.
fn check_step_config(at: &At, key: &str, c: &StepConfig, dtype: Precision) -> Result<()> {
    let k = |f: &str| format!("{key}.{f}");
    let beta = c.kl_beta;
    let beta_ok = beta.is_finite() && (0.0..=MAX_KL_BETA).contains(&beta);
    at.expect(
        &k("kl_beta"),
        beta,
        beta_ok,
        &format!("in [0, {MAX_KL_BETA}]"),
    )?;
    for (f, v) in [
        ("kl_free_bits", c.kl_free_bits),
        ("freq_alpha", c.freq_alpha),
        ("mse_weight", c.mse_weight),
    ] {
        at.non_negative(&k(f), v)?;
    }
    let clip = c.clip_norm;
    at.expect(
        &k("clip_norm"),
        clip,
        clip.is_finite() && clip > 0.0,
        "finite and > 0",
    )?;
    let decay = c.ema_decay;
    at.expect(
        &k("ema_decay"),
        decay,
        (0.0..1.0).contains(&decay),
        "in [0, 1)",
    )?;
    if c.adaptive_window == 0 || c.adaptive_window > MAX_WINDOW {
        return Err(at.bad(
            &k("adaptive_window"),
            c.adaptive_window,
            format!("must be between 1 and {MAX_WINDOW}"),
        ));
    }
    at.count_at_most(
        &k("kl_warmup_steps"),
        c.kl_warmup_steps,
        MAX_STEPS,
        "the most steps a run may have",
    )?;
    for (f, v) in [
        ("kl_beta", c.kl_beta),
        ("kl_free_bits", c.kl_free_bits),
        ("freq_alpha", c.freq_alpha),
        ("mse_weight", c.mse_weight),
        ("clip_norm", c.clip_norm),
    ] {
        at.in_dtype(&k(f), v, dtype)?;
    }
    Ok(())
}
