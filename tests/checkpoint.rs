//! Saving and loading checkpoints under the reference names, and the errors for bad files.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{parity, tiny16};
use fluxflow::model::{FluxModel, ModelConfig, Noise};
use fluxflow::weights::{load_model, read_tensors, save_model, to_safetensors_bytes, TEXT_FILE};

fn tiny() -> ModelConfig {
    ModelConfig {
        vae_dim: 8,
        vae_attn_layers: 2,
        vae_attn_heads: 8,
        flow_dim: 8,
        flow_heads: 2,
        flow_layers: 1,
        text_embedding_dim: 8,
        text_hidden: 8,
        ..ModelConfig::default()
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fluxflow-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load_err(path: &Path) -> String {
    match load_model(path, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn write(path: &Path, tensors: &HashMap<String, Tensor>) {
    let list: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    std::fs::write(path, to_safetensors_bytes(&list).unwrap()).unwrap();
}

#[test]
fn saved_model_reloads_identically_in_float32_on_disk() {
    let dir = tmpdir("roundtrip");
    let model = FluxModel::fresh(&tiny(), DType::F64, &Device::Cpu, 3).unwrap();
    let path = dir.join("model.safetensors");
    save_model(&model, &path).unwrap();

    let on_disk = read_tensors(&path).unwrap();
    assert!(on_disk.keys().all(|k| k.starts_with("diffuser.")));
    assert!(on_disk.values().all(|t| t.dtype() == DType::F32));
    let text = read_tensors(&dir.join(TEXT_FILE)).unwrap();
    assert!(
        !text.is_empty()
            && text
                .keys()
                .all(|k| k.starts_with("text_encoder.ouput_layer."))
    );

    let loaded = load_model(&path, DType::F64, &Device::Cpu).unwrap();
    assert_eq!(
        loaded.text_source.as_deref(),
        Some(dir.join(TEXT_FILE).as_path())
    );
    assert_eq!(loaded.model.config, tiny());
    let a = model.params.tensors("");
    let b = loaded.model.params.tensors("");
    assert_eq!(a.len(), b.len());
    for ((ka, ta), (kb, tb)) in a.iter().zip(&b) {
        assert_eq!(ka, kb);
        let (va, vb): (Vec<f64>, Vec<f64>) = (
            ta.flatten_all().unwrap().to_vec1().unwrap(),
            tb.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(va, vb, "{ka} changed in the round trip");
    }
    let img = Tensor::rand(-1f64, 1.0, (1, 3, 32, 16), &Device::Cpu).unwrap();
    let run = |m: &FluxModel| -> Vec<f64> {
        let enc = m.compressor.forward(&img, Noise::Mean).unwrap();
        let y = m.expander.forward(&enc.packed, true).unwrap();
        y.flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(run(&model), run(&loaded.model));
}

#[test]
fn reference_fixture_loads_with_text_projection_from_the_same_file() {
    let loaded = load_model(&parity("tiny16.safetensors"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config.vae_dim, 16);
    assert_eq!(loaded.model.config.flow_heads, 2);
    assert_eq!(loaded.model.config.text_hidden, 24);
    assert!(loaded.text_source.is_some());
}

#[test]
fn missing_unexpected_and_misshaped_tensors_are_named() {
    let dir = tmpdir("bad-tensors");
    let base: HashMap<String, Tensor> = tiny16()
        .into_iter()
        .filter(|(k, _)| k.starts_with("diffuser.") || k.starts_with("text_encoder."))
        .collect();

    let mut missing = base.clone();
    missing.remove("diffuser.expander.upscale.layers.2.spade.mlp_beta.bias");
    missing.remove("text_encoder.ouput_layer.4.weight");
    let p = dir.join("missing.safetensors");
    write(&p, &missing);
    let e = load_err(&p);
    assert!(e.contains("missing tensors (2)"), "{e}");
    assert!(
        e.contains("diffuser.expander.upscale.layers.2.spade.mlp_beta.bias"),
        "{e}"
    );
    assert!(e.contains("text_encoder.ouput_layer.4.weight"), "{e}");
    assert!(e.contains("missing.safetensors"), "{e}");

    let mut extra = base.clone();
    let t = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    extra.insert("diffuser.expander.surprise.weight".into(), t);
    let p = dir.join("extra.safetensors");
    write(&p, &extra);
    let e = load_err(&p);
    assert!(
        e.contains("unexpected tensors (1): diffuser.expander.surprise.weight"),
        "{e}"
    );

    let mut shaped = base.clone();
    let name = "diffuser.compressor.token_attn.1.norm2.weight";
    shaped.insert(
        name.into(),
        Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = dir.join("shaped.safetensors");
    write(&p, &shaped);
    let e = load_err(&p);
    assert!(
        e.contains(&format!("{name} (expected [16], found [7])")),
        "{e}"
    );
}

#[test]
fn truncated_empty_foreign_and_absent_files_are_errors_naming_the_file() {
    let dir = tmpdir("bad-files");
    let good = std::fs::read(parity("tiny16.safetensors")).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let empty = dir.join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    let foreign = dir.join("foreign.safetensors");
    std::fs::write(&foreign, b"\x89PNG\r\n\x1a\nnot a checkpoint at all").unwrap();
    let header_only = dir.join("header.safetensors");
    std::fs::write(&header_only, &good[..1000]).unwrap();

    for p in [&truncated, &empty, &foreign, &header_only] {
        let e = load_err(p);
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
    assert!(load_err(&empty).contains("is empty"));
    assert!(load_err(&truncated).contains("not a valid safetensors file"));
    let absent = dir.join("absent.safetensors");
    let e = load_err(&absent);
    assert!(
        e.contains("cannot read") && e.contains("absent.safetensors"),
        "{e}"
    );

    let not_model = dir.join("other.safetensors");
    let mut m = HashMap::new();
    m.insert(
        "weight".to_string(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    write(&not_model, &m);
    let e = load_err(&not_model);
    assert!(e.contains("cannot detect the VAE dimension"), "{e}");
}

#[test]
fn serialisation_borrows_storage_and_writes_what_candle_writes() {
    let dev = Device::Cpu;
    let base = Tensor::arange(0f32, 60., &dev)
        .unwrap()
        .reshape((6, 10))
        .unwrap();
    let tensors = vec![
        // Contiguous rows starting inside the storage (a non-zero offset).
        ("a.offset".to_string(), base.narrow(0, 2, 3).unwrap()),
        // Not contiguous: copied first.
        ("b.transposed".to_string(), base.t().unwrap()),
        ("c.f64".to_string(), Tensor::arange(0f64, 7., &dev).unwrap()),
        (
            "d.bf16".to_string(),
            base.to_dtype(candle_core::DType::BF16).unwrap(),
        ),
    ];
    let ours = fluxflow::weights::to_safetensors_bytes_exact(&tensors).unwrap();
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.contiguous().unwrap()))
        .collect();
    let meta: std::collections::HashMap<String, String> =
        [("format".to_string(), "pt".to_string())].into();
    let candles =
        safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
            .unwrap();
    assert_eq!(ours, candles);
}

#[test]
fn a_reference_text_file_with_its_backbone_loads_and_integer_model_tensors_are_refused() {
    let dir = tmpdir("backbone");
    let model = FluxModel::fresh(&tiny(), DType::F32, &Device::Cpu, 3).unwrap();
    let path = dir.join("model.safetensors");
    save_model(&model, &path).unwrap();
    // The reference saves DistilBERT beside the projection, with an int64 buffer among it.
    let text_path = dir.join(TEXT_FILE);
    let mut text = read_tensors(&text_path).unwrap();
    text.insert(
        "text_encoder.language_model.embeddings.position_ids".into(),
        Tensor::arange(0i64, 16, &Device::Cpu).unwrap(),
    );
    text.insert(
        "text_encoder.language_model.embeddings.word_embeddings.weight".into(),
        Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&text, &text_path).unwrap();
    let loaded = load_model(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.text_source.as_deref(), Some(text_path.as_path()));

    // An integer tensor the model uses is refused by name.
    text.insert(
        "text_encoder.ouput_layer.0.bias".into(),
        Tensor::zeros(8, DType::I64, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&text, &text_path).unwrap();
    let e = format!(
        "{:#}",
        load_model(&path, DType::F32, &Device::Cpu).err().unwrap()
    );
    assert!(
        e.contains("text_encoder.ouput_layer.0.bias") && e.contains("stored as I64"),
        "{e}"
    );
}
