//! Configuration files: the Phase 1 config and optimizer JSON, a reference-shaped config,
//! unknown keys, unsupported features, overrides.

use std::path::PathBuf;

use fluxflow::config::{Config, OptimFile, Overrides, QUICKSTART};
use fluxflow::train::optim::OptimizerSpec;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn err(text: &str, o: &Overrides) -> String {
    match Config::parse(text, "test.yaml", o) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn phase1_config_has_the_report_values() {
    let cfg = Config::load(
        &root().join("configs/config-p1-128.yaml"),
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(cfg.model.vae_dim, 128);
    assert_eq!(cfg.model.feature_maps_dim, 128);
    assert_eq!(cfg.model.text_embedding_dim, 1024);
    let t = &cfg.training;
    assert_eq!((t.n_epochs, t.batch_size, t.lr), (3, 2, 1e-6));
    assert_eq!(
        (t.kl_beta, t.kl_warmup_steps, t.kl_free_bits),
        (1e-4, 5000, 1024.0)
    );
    assert_eq!(t.initial_clipping_norm, 1.0);
    assert!(t.train_vae && t.train_spade && !t.gan_training && !t.use_lpips && !t.train_diff);
    let o = &cfg.output;
    // A sample every 100 steps.
    assert_eq!(o.checkpoint_save_interval * o.samples_per_checkpoint, 100);
    assert_eq!(cfg.model_config(), fluxflow::model::ModelConfig::default());
    let w = cfg.warnings().join("\n");
    assert!(
        w.contains("kl_free_bits = 1024") && w.contains("no gradient"),
        "{w}"
    );
}

#[test]
fn phase1_optimizer_json_gives_the_report_optimizers() {
    let f = OptimFile::load(&root().join("configs/optim-config-p1.json")).unwrap();
    match f.optimizer("vae", 1e-6).unwrap() {
        OptimizerSpec::RmsProp(c) => {
            assert_eq!(
                (c.lr, c.alpha, c.momentum, c.centered),
                (1e-5, 0.95, 0.9, true)
            )
        }
        other => panic!("{other:?}"),
    }
    match f.optimizer("flow", 1e-6).unwrap() {
        OptimizerSpec::AdamW(c) => {
            assert_eq!((c.lr, c.betas, c.weight_decay), (1e-5, (0.9, 0.95), 0.01))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.optimizer("text_encoder", 1e-6).unwrap().lr(), 5e-8);
    let s = serde_json::to_value(f.scheduler("vae", 0.1, 1000).unwrap()).unwrap();
    assert_eq!(s["type"], "CosineAnnealingLR");
    assert_eq!(s["eta_min_factor"], 0.001);
}

/// Every key of the reference's config.example.yaml (values of our choosing).
const REFERENCE_SHAPED: &str = r#"
model:
  vae_dim: 32
  feature_maps_dim: 32
  feature_maps_dim_disc: 8
  text_embedding_dim: 1024
  pretrained_bert_model: null
data:
  data_path: "/data/images"
  captions_file: "/data/captions.txt"
  fixed_prompt_prefix: null
  use_webdataset: false
  webdataset_token: null
  webdataset_url: "hf://datasets/some/set/*.tar"
  webdataset_image_key: "png"
  webdataset_label_key: "json"
  webdataset_caption_key: "prompt"
  webdataset_size: 1000
  webdataset_samples_per_shard: 100
  dataloader_max_retries: 5
  dataloader_retry_delay: 5.0
  img_size: 1024
  channels: 3
  tokenizer_name: "distilbert-base-uncased"
  reduced_min_sizes: null
training:
  n_epochs: 10
  batch_size: 1
  workers: 8
  lr: 0.00001
  lr_min: 0.01
  training_steps: 1
  use_fp16: false
  initial_clipping_norm: 1.0
  preserve_lr: true
  train_vae: true
  gan_training: GAN
  use_lpips: LPIPS
  train_spade: true
  train_diff: false
  train_diff_full: false
  kl_beta: 0.0001
  kl_warmup_steps: 5000
  kl_free_bits: 0.0
  lambda_adv: 0.5
  lambda_lpips: 0.1
optimization:
  optim_sched_config: null
output:
  output_path: "outputs/flux"
  log_interval: 10
  checkpoint_save_interval: 50
  samples_per_checkpoint: 1
  no_samples: false
  test_image_address:
    - "template.png"
  sample_captions:
    - "a caption"
  sample_sizes:
    - 256
    - [768, 512]
  log_level: "INFO"
  log_file: null
model_checkpoint: null
"#;

#[test]
fn a_reference_config_parses_and_unsupported_features_are_named() {
    let ok = REFERENCE_SHAPED
        .replace("GAN", "false")
        .replace("LPIPS", "false");
    let cfg = Config::parse(&ok, "config.yaml", &Overrides::default()).unwrap();
    assert_eq!(cfg.model.vae_dim, 32);
    assert_eq!(cfg.data.img_size, Some(1024));
    let gan = REFERENCE_SHAPED
        .replace("GAN", "true")
        .replace("LPIPS", "false");
    let e = err(&gan, &Overrides::default());
    assert!(
        e.contains("training.gan_training") && e.contains("not support"),
        "{e}"
    );
    let lpips = REFERENCE_SHAPED
        .replace("GAN", "false")
        .replace("LPIPS", "true");
    assert!(err(&lpips, &Overrides::default()).contains("training.use_lpips"));
    let flow = ok.replace("train_diff: false", "train_diff: true");
    assert!(err(&flow, &Overrides::default()).contains("training.train_diff"));
    let wds = ok.replace("use_webdataset: false", "use_webdataset: true");
    assert!(err(&wds, &Overrides::default()).contains("data.use_webdataset"));
}

#[test]
fn unknown_keys_are_errors_naming_key_and_file() {
    let e = err("training:\n  learning_rate: 0.1\n", &Overrides::default());
    assert!(
        e.contains("test.yaml") && e.contains("learning_rate"),
        "{e}"
    );
    let e = err("trainning:\n  lr: 0.1\n", &Overrides::default());
    assert!(e.contains("trainning"), "{e}");
    let o = Overrides {
        set: vec!["training.lr_typo=3".into()],
        ..Overrides::default()
    };
    let e = err(QUICKSTART, &o);
    assert!(e.contains("lr_typo"), "{e}");
}

#[test]
fn overrides_apply_over_the_file() {
    // --data must name an existing folder, and one a non-synthetic configuration reads.
    let imgs = std::env::temp_dir();
    let o = Overrides {
        data: Some(imgs.clone()),
        output: Some(PathBuf::from("/out")),
        max_steps: Some(7),
        device: Some("cuda:1".into()),
        set: vec![
            "training.lr=0.5".into(),
            "output.keep_last=5".into(),
            "data.synthetic=null".into(),
        ],
        flags: vec![],
    };
    let cfg = Config::parse(QUICKSTART, "q", &o).unwrap();
    assert_eq!(cfg.data.data_path.as_deref(), Some(imgs.as_path()));
    assert_eq!(cfg.output.output_path, PathBuf::from("/out"));
    assert_eq!(cfg.training.max_steps, Some(7));
    assert_eq!(cfg.training.device.to_string(), "cuda:1");
    assert_eq!(cfg.training.lr, 0.5);
    assert_eq!(cfg.output.keep_last, 5);
    let bad = Overrides {
        set: vec!["training.max_runtime=5 hours".into()],
        ..Overrides::default()
    };
    assert!(err(QUICKSTART, &bad).contains("max_runtime"));
}

#[test]
fn mixed_precision_and_checkpointing_settings_are_checked() {
    use fluxflow::train::precision::MixedPrecision;
    let o = Overrides::default();
    let base = "data: {data_path: unused}\n";
    // Defaults: no mixed precision, checkpointing on (as the reference's models).
    let cfg = Config::parse(base, "test.yaml", &o).unwrap();
    assert_eq!(cfg.step_config().mixed_precision, MixedPrecision::No);
    assert!(cfg.step_config().recompute);
    let off = format!("{base}model: {{use_gradient_checkpointing: false}}\n");
    assert!(
        !Config::parse(&off, "test.yaml", &o)
            .unwrap()
            .step_config()
            .recompute
    );
    let bf16 = format!("{base}training: {{mixed_precision: bf16, device: cuda}}\n");
    // (A build without the cuda feature refuses the device later, when it is opened.)
    let cfg = Config::parse(&bf16, "test.yaml", &o).unwrap();
    assert_eq!(cfg.step_config().mixed_precision, MixedPrecision::Bf16);
    // bf16 on the CPU, fp16 (also as the reference's use_fp16), f64 masters, unknown values.
    let cpu = format!("{base}training: {{mixed_precision: bf16}}\n");
    let e = err(&cpu, &o);
    assert!(
        e.contains("training.mixed_precision") && e.contains("CUDA"),
        "{e}"
    );
    let fp16 = format!("{base}training: {{use_fp16: true}}\n");
    let e = err(&fp16, &o);
    assert!(e.contains("training.use_fp16") && e.contains("CUDA"), "{e}");
    let fp16 = format!("{base}training: {{use_fp16: true, device: cuda}}\n");
    let cfg = Config::parse(&fp16, "test.yaml", &o).unwrap();
    assert_eq!(cfg.step_config().mixed_precision, MixedPrecision::Fp16);
    let f64m = format!("{base}training: {{mixed_precision: bf16, device: cuda, dtype: f64}}\n");
    assert!(err(&f64m, &o).contains("training.dtype"));
    let bad = format!("{base}training: {{mixed_precision: half}}\n");
    let e = err(&bad, &o);
    assert!(
        e.contains("mixed_precision") && e.contains("test.yaml"),
        "{e}"
    );
}

fn set(keys: &[&str]) -> Overrides {
    Overrides {
        set: keys.iter().map(|s| s.to_string()).collect(),
        ..Overrides::default()
    }
}

#[test]
fn typed_settings_are_checked_when_read_naming_the_key() {
    let cases = [
        ("training.dtype=f16", "training.dtype"),
        ("training.device=gpu", "training.device"),
        ("output.log_level=LOUD", "output.log_level"),
        ("training.preserve_lr=false", "training.preserve_lr"),
    ];
    for (s, key) in cases {
        let e = err(QUICKSTART, &set(&[s]));
        assert!(
            e.contains(key) && e.contains(&format!("--set {s}")),
            "{s}: {e}"
        );
    }
    let cfg = Config::parse(
        QUICKSTART,
        "q",
        &set(&[
            "training.dtype=f64",
            "training.device=cuda:1",
            "output.log_level=warning",
        ]),
    )
    .unwrap();
    assert_eq!(cfg.training.dtype.dtype(), candle_core::DType::F64);
    assert_eq!(cfg.training.device.to_string(), "cuda:1");
    assert_eq!(cfg.output.log_level, fluxflow::config::LogLevel::Warning);
    // Written back as given, so a run's config copy reads back the same.
    let again = Config::parse(
        &serde_yaml::to_string(&cfg).unwrap(),
        "copy",
        &Overrides::default(),
    )
    .unwrap();
    assert_eq!(again, cfg);
}

#[test]
fn reference_keys_without_effect_are_named_in_a_warning() {
    let values = |key: &str| -> &str {
        match key {
            "model.feature_maps_dim_disc"
            | "data.webdataset_size"
            | "data.webdataset_samples_per_shard"
            | "data.dataloader_max_retries" => "7",
            "data.dataloader_retry_delay" | "training.lambda_adv" | "training.lambda_lpips" => {
                "0.25"
            }
            "output.generate_diagrams" => "true",
            "output.sample_captions" => "[a cat]",
            "output.sample_sizes" => "[512]",
            _ => "something",
        }
    };
    let quiet = Config::parse(QUICKSTART, "q", &Overrides::default()).unwrap();
    assert!(
        !quiet.warnings().iter().any(|w| w.contains("has no effect")),
        "{:?}",
        quiet.warnings()
    );
    for (key, _) in fluxflow::config::INERT_KEYS {
        let s = format!("{key}={}", values(key));
        let cfg =
            Config::parse(QUICKSTART, "q", &set(&[&s])).unwrap_or_else(|e| panic!("{s}: {e:#}"));
        let w = cfg.warnings();
        assert!(
            w.iter()
                .any(|w| w.contains(key) && w.contains("has no effect")),
            "{s}: {w:?}"
        );
    }
}

/// Every leaf key of the configuration, as `section.key`.
fn leaf_keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaf_keys(v, &key, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_accepted_key_is_honoured_refused_when_on_or_named_as_inert() {
    // Keys that change what a run does (each is read by the code that trains, samples, logs,
    // evaluates or checkpoints); a new key must be added here, to INERT_KEYS, or to the
    // refused list, so that none is accepted and ignored silently.
    let honoured = [
        "model.vae_dim",
        "model.feature_maps_dim",
        "model.text_embedding_dim",
        "model.downscales",
        "model.vae_attn_layers",
        "model.vae_attn_heads",
        "model.flow_heads",
        "model.flow_layers",
        "model.text_hidden",
        "model.use_gradient_checkpointing",
        "model.activation",
        "model.baseline_width_mult",
        "model.model_type",
        "data.data_path",
        "data.captions_file",
        "data.img_size",
        "data.channels",
        "data.synthetic",
        "training.n_epochs",
        "training.batch_size",
        "training.workers",
        "training.lr",
        "training.lr_min",
        "training.use_fp16",
        "training.initial_clipping_norm",
        "training.preserve_lr",
        "training.train_spade",
        "training.kl_beta",
        "training.kl_warmup_steps",
        "training.kl_free_bits",
        "training.max_steps",
        "training.max_runtime",
        "training.seed",
        "training.adaptive_weights",
        "training.freq_alpha",
        "training.mse_weight",
        "training.ema_decay",
        "training.dtype",
        "training.mixed_precision",
        "training.device",
        "training.training_steps",
        "optimization.optim_sched_config",
        "output.output_path",
        "output.log_interval",
        "output.checkpoint_save_interval",
        "output.samples_per_checkpoint",
        "output.no_samples",
        "output.test_image_address",
        "output.log_level",
        "output.keep_last",
        "output.eval_data",
        "output.eval_interval",
        "output.eval_limit",
        "model_checkpoint",
    ];
    // Features refused when switched on (a_reference_config_parses_and_unsupported_features_are_named).
    let refused = [
        "training.train_vae",
        "training.gan_training",
        "training.use_lpips",
        "training.train_diff",
        "training.train_diff_full",
        "data.use_webdataset",
        "data.use_tt2m",
        "data.reduced_min_sizes",
        "output.log_file",
    ];
    let mut keys = Vec::new();
    leaf_keys(
        &serde_json::to_value(Config::default()).unwrap(),
        "",
        &mut keys,
    );
    let inert: Vec<&str> = fluxflow::config::INERT_KEYS
        .iter()
        .map(|(k, _)| *k)
        .collect();
    let unclassified: Vec<&String> = keys
        .iter()
        .filter(|k| {
            !honoured.contains(&k.as_str())
                && !refused.contains(&k.as_str())
                && !inert.contains(&k.as_str())
        })
        .collect();
    assert!(
        unclassified.is_empty(),
        "accepted but unclassified: {unclassified:?}"
    );
    let stale: Vec<&&str> = honoured
        .iter()
        .chain(&refused)
        .chain(&inert)
        .filter(|k| !keys.contains(&k.to_string()))
        .collect();
    assert!(stale.is_empty(), "listed but not accepted: {stale:?}");
}
