//! Serialises tensors in safetensors format, borrowing each CPU tensor's bytes.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};

/// Serialises tensors (converted to float32, CPU, contiguous) in safetensors format.
pub fn to_safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    serialize(tensors, Some(DType::F32), &[])
}

/// Serialises tensors in safetensors format, each in its own dtype (for exact resume state).
pub fn to_safetensors_bytes_exact(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    serialize(tensors, None, &[])
}

pub(crate) fn serialize(
    tensors: &[(String, Tensor)],
    dtype: Option<DType>,
    extra_meta: &[(String, String)],
) -> Result<Vec<u8>> {
    let converted = tensors
        .iter()
        .map(|(k, t)| {
            let t = t.to_device(&Device::Cpu)?;
            let t = match dtype {
                Some(d) => t.to_dtype(d)?,
                None => t,
            };
            Ok((k.clone(), t.contiguous()?))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    meta.extend(extra_meta.iter().cloned());
    let views = converted
        .iter()
        .map(|(k, t)| Ok((k.as_str(), cpu_view(t)?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(meta)).map_err(|e| anyhow!("cannot serialise tensors: {e}"))
}

/// A contiguous CPU tensor's bytes, borrowed from its storage: candle's own `View` copies each
/// tensor into a vector first, so serialising through it copies every file twice.
struct CpuView<'a, G> {
    /// The storage's read guard (candle's lock type), held while the bytes are borrowed.
    storage: G,
    /// First element and element count within the storage.
    start: usize,
    len: usize,
    tensor: &'a Tensor,
}

fn cpu_view(
    t: &Tensor,
) -> Result<CpuView<'_, impl std::ops::Deref<Target = candle_core::Storage> + '_>> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("internal: a tensor to serialise is not contiguous");
    };
    if !matches!(&*storage, candle_core::Storage::Cpu(_)) {
        bail!("internal: a tensor to serialise is not on the CPU");
    }
    Ok(CpuView {
        storage,
        start,
        len: end - start,
        tensor: t,
    })
}

/// The bytes of `v[start..start + len]`.
fn bytes_of<T: Copy>(v: &[T], start: usize, len: usize) -> &[u8] {
    let v = &v[start..start + len];
    // SAFETY: `v` is valid for reads of `size_of_val(v)` bytes for the returned lifetime (the
    // result borrows `v`, so nothing can write it meanwhile). The only callers (`data` below)
    // pass u8, u32, i16, i32, i64, bf16, f16 (both repr(transparent) over u16), f32 and f64
    // slices: types without padding, so every byte is initialised; u8 needs no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> safetensors::View for CpuView<'_, G> {
    fn dtype(&self) -> safetensors::Dtype {
        self.tensor.dtype().into()
    }

    fn shape(&self) -> &[usize] {
        self.tensor.dims()
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        use candle_core::CpuStorage as C;
        let (s, n) = (self.start, self.len);
        let bytes = match &*self.storage {
            candle_core::Storage::Cpu(c) => match c {
                C::U8(v) => bytes_of(v, s, n),
                C::U32(v) => bytes_of(v, s, n),
                C::I16(v) => bytes_of(v, s, n),
                C::I32(v) => bytes_of(v, s, n),
                C::I64(v) => bytes_of(v, s, n),
                C::BF16(v) => bytes_of(v, s, n),
                C::F16(v) => bytes_of(v, s, n),
                C::F32(v) => bytes_of(v, s, n),
                C::F64(v) => bytes_of(v, s, n),
                // Types a weights file never holds: candle's own copy.
                _ => return safetensors::View::data(&self.tensor),
            },
            _ => return safetensors::View::data(&self.tensor),
        };
        std::borrow::Cow::Borrowed(bytes)
    }

    fn data_len(&self) -> usize {
        self.len * self.tensor.dtype().size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_bytes_keep_each_dtype_and_float32_bytes_convert() {
        let dev = Device::Cpu;
        let t64 = Tensor::new(&[1.0f64 / 3.0, -0.0, 2.5], &dev).unwrap();
        // A non-contiguous view is serialised as its logical elements.
        let t32 = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)
            .unwrap()
            .t()
            .unwrap();
        let tensors = vec![("x".to_string(), t64.clone()), ("y".to_string(), t32)];
        let exact =
            safetensors::SafeTensors::deserialize(&to_safetensors_bytes_exact(&tensors).unwrap())
                .unwrap()
                .tensor("x")
                .map(|v| (v.dtype(), v.data().to_vec()))
                .unwrap();
        assert_eq!(exact.0, safetensors::Dtype::F64);
        let want: Vec<u8> = [1.0f64 / 3.0, -0.0, 2.5]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(exact.1, want);
        let bytes = to_safetensors_bytes(&tensors).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let y = st.tensor("y").unwrap();
        assert_eq!(y.dtype(), safetensors::Dtype::F32);
        let want: Vec<u8> = [1f32, 3.0, 2.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(y.data(), &want[..]);
        assert_eq!(st.tensor("x").unwrap().dtype(), safetensors::Dtype::F32);
    }
}
