//! The Phase 1 model's names, shapes and parameter counts against the reference manifest, and
//! the training path's gradients.

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::parity;
use fluxflow::model::{FluxModel, ModelConfig, Noise, COMPRESSOR, EXPANDER, FLOW};

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(parity("p1-128-manifest.json")).expect("the manifest");
    serde_json::from_str(&text).expect("manifest JSON")
}

#[test]
fn phase1_names_and_shapes_equal_the_reference_manifest() {
    let m = manifest();
    let model = FluxModel::fresh(&ModelConfig::default(), DType::F32, &Device::Cpu, 0).unwrap();
    let ours: BTreeMap<String, Vec<usize>> = model
        .params
        .tensors("")
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect();
    let mut theirs = BTreeMap::new();
    for group in ["diffuser", "text_encoder"] {
        for (k, v) in m[group].as_object().unwrap() {
            let shape: Vec<usize> = serde_json::from_value(v.clone()).unwrap();
            theirs.insert(k.clone(), shape);
        }
    }
    let missing: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
    assert!(missing.is_empty(), "missing: {missing:?}");
    assert!(extra.is_empty(), "not in the reference: {extra:?}");
    for (k, shape) in &theirs {
        assert_eq!(&ours[k], shape, "shape of {k}");
    }

    let count = |prefix: &str| -> usize {
        model
            .params
            .trainable(prefix)
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    };
    let expected = &m["parameters"];
    assert_eq!(count(COMPRESSOR), 12_580_553);
    assert_eq!(count(EXPANDER), 94_073_551);
    assert_eq!(count(FLOW), 5_373_824);
    assert_eq!(
        count(COMPRESSOR) as u64,
        expected["compressor"].as_u64().unwrap()
    );
    assert_eq!(
        count(EXPANDER) as u64,
        expected["expander"].as_u64().unwrap()
    );
    assert_eq!(
        count(FLOW) as u64,
        expected["flow_processor"].as_u64().unwrap()
    );
    assert_eq!(
        count("diffuser.") as u64,
        m["parameters_total"].as_u64().unwrap()
    );
}

fn tiny() -> ModelConfig {
    ModelConfig {
        vae_dim: 8,
        vae_attn_layers: 2,
        vae_attn_heads: 2,
        flow_dim: 8,
        flow_heads: 2,
        flow_layers: 1,
        text_embedding_dim: 8,
        text_hidden: 8,
        ..ModelConfig::default()
    }
}

#[test]
fn every_vae_tensor_gets_a_finite_nonzero_gradient() {
    let model = FluxModel::fresh(&tiny(), DType::F64, &Device::Cpu, 1).unwrap();
    let img = Tensor::rand(-1f64, 1.0, (2, 3, 32, 32), &Device::Cpu).unwrap();
    let eps = Tensor::randn(0f64, 1.0, (2, 8, 2, 2), &Device::Cpu).unwrap();
    let enc = model.compressor.forward(&img, Noise::Given(&eps)).unwrap();
    let recon = model.expander.forward(&enc.packed, true).unwrap();
    let mse = (&recon - &img).unwrap().sqr().unwrap().mean_all().unwrap();
    let kl = ((enc.mu.sqr().unwrap() + enc.logvar.exp().unwrap()).unwrap() - 1.0)
        .unwrap()
        .sub(&enc.logvar)
        .unwrap()
        .mean_all()
        .unwrap();
    let loss = (mse + (kl * 0.5).unwrap()).unwrap();
    let grads = loss.backward().unwrap();

    let mut checked = 0;
    let vae: Vec<_> = model
        .params
        .trainable(COMPRESSOR)
        .into_iter()
        .chain(model.params.trainable(EXPANDER))
        .collect();
    for (name, var) in &vae {
        let g = grads.get(var.as_tensor());
        if name.starts_with("diffuser.expander.context_mixer.") {
            assert!(
                g.is_none(),
                "{name} is unused by the forward yet has a gradient"
            );
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("{name} has no gradient"));
        let v: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|x| *x != 0.0), "{name}: all-zero gradient");
        checked += 1;
    }
    assert!(checked > 50, "only {checked} tensors checked");
}

/// max |x| and whether every element equals `v`.
fn stats(model: &FluxModel, name: &str) -> (f64, usize, Vec<f64>) {
    let t = model
        .params
        .tensors(name)
        .into_iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("{name}"))
        .1;
    let v: Vec<f64> = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap();
    let max = v.iter().fold(0f64, |a, b| a.max(b.abs()));
    (max, v.len(), v)
}

#[test]
fn fresh_weights_follow_the_reference_initialisation() {
    let model = FluxModel::fresh(&tiny(), DType::F64, &Device::Cpu, 2).unwrap();
    // PyTorch default (kaiming_uniform a=sqrt(5)): U(+-1/sqrt(fan_in)) for weight and bias.
    let torch = [
        ("diffuser.compressor.encoder_first_step.0.0.weight", 5 * 9),
        ("diffuser.compressor.encoder_z.1.0.bias", 6 * 64),
        (
            "diffuser.expander.upscale.layers.0.spade.mlp_shared.0.weight",
            8 * 9,
        ),
        // Transposed conv: fan_in from the weight's dim 1 (out channels x k x k).
        (
            "diffuser.expander.upscale.layers.0.conv1.0.weight",
            40 * 256,
        ),
        ("diffuser.compressor.token_attn.0.attn.out_proj.weight", 8),
    ];
    for (name, fan_in) in torch {
        let bound = 1.0 / (fan_in as f64).sqrt();
        let (max, n, _) = stats(&model, name);
        assert!(
            max <= bound && max > 0.8 * bound,
            "{name}: max {max}, bound {bound} ({n} values)"
        );
    }
    // Xavier uniform: U(+-sqrt(6 / (fan_in + fan_out))), zero bias.
    let xavier = [
        (
            "diffuser.compressor.token_attn.0.attn.in_proj_weight",
            8 + 24,
        ),
        ("diffuser.expander.context_mixer.q_proj.weight", 16),
        (
            "diffuser.flow_processor.transformer_blocks.0.p0.1.0.weight",
            16,
        ),
        ("text_encoder.ouput_layer.0.weight", 8 + 2560),
    ];
    for (name, fans) in xavier {
        let bound = (6.0 / fans as f64).sqrt();
        let (max, _, _) = stats(&model, name);
        assert!(
            max <= bound && max > 0.8 * bound,
            "{name}: max {max}, bound {bound}"
        );
    }
    for zero in [
        "diffuser.compressor.token_attn.0.attn.in_proj_bias",
        "diffuser.compressor.token_attn.0.attn.out_proj.bias",
        "diffuser.expander.context_mixer.q_proj.bias",
        "diffuser.expander.context_mixer.cls",
        "text_encoder.ouput_layer.3.bias",
    ] {
        assert_eq!(stats(&model, zero).0, 0.0, "{zero}");
    }
    let (_, _, ln) = stats(&model, "diffuser.compressor.token_attn.0.norm1.weight");
    assert!(ln.iter().all(|v| *v == 1.0));
    let (_, _, p1) = stats(&model, "diffuser.compressor.logvar_activation.p1");
    assert!(p1.iter().all(|v| *v == -1.0));
    let (_, _, rgb0) = stats(&model, "diffuser.expander.rgb_activation.p0");
    assert!(rgb0.iter().all(|v| *v == -1.0));
    // Embedding: N(0, 1).
    let (_, n, e) = stats(&model, "diffuser.flow_processor.time_embed.0.weight");
    let mean = e.iter().sum::<f64>() / n as f64;
    let var = e.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
    assert!(
        mean.abs() < 0.05 && (var - 1.0).abs() < 0.1,
        "mean {mean}, var {var}"
    );
}
