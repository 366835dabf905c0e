//! Model files that do not fit what is asked of them, through the binary: each error names the
//! file and what is missing or different, and a run's own model file warm-starts a run of the
//! same configuration.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use common::{bin, parity, text};

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("model-files", name)
}

/// Runs `cmd` to its end, failing the test (and killing the process) after two minutes.
fn run(cmd: &mut Command) -> Output {
    let limit = Duration::from_secs(120);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fluxflow starts");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Two 32x32 PNGs in `dir`.
fn images(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..2u32 {
        image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, (i * 90) as u8])
        })
        .save(dir.join(format!("img{i}.png")))
        .unwrap();
    }
}

/// A tiny run's configuration (the quickstart's model: `vae_attn_heads: 2` and
/// `text_hidden: 8`, which the default detection would not give) on `data` into `dir/<run>`,
/// starting from `start` if given.
fn config(dir: &Path, data: &Path, run: &str, vae_dim: usize, start: Option<&Path>) -> PathBuf {
    let start = start.map_or("null".to_string(), |p| p.display().to_string());
    let text = format!(
        "model: {{vae_dim: {vae_dim}, feature_maps_dim: 8, text_embedding_dim: 8,
         vae_attn_layers: 1, vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8,
         use_gradient_checkpointing: false}}
model_checkpoint: {start}
data:
  data_path: {}
training:
  batch_size: 2
  max_steps: 1
  lr: 0.001
  seed: 3
output:
  output_path: {}
  checkpoint_save_interval: 1000
  no_samples: true
",
        data.display(),
        dir.join(run).display()
    );
    let p = dir.join(format!("{run}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn a_model_file_without_its_expander_is_named_with_the_missing_tensors() {
    let dir = tmpdir("no-expander");
    let file = dir.join("no_expander.safetensors");
    let tensors: HashMap<String, Tensor> =
        fluxflow::weights::read_tensors(&parity("tiny16.safetensors"))
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.starts_with("diffuser.") && !k.starts_with("diffuser.expander."))
            .collect();
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let img = dir.join("in.png");
    image::RgbImage::new(32, 32).save(&img).unwrap();
    for args in [
        vec!["info", file.to_str().unwrap()],
        vec![
            "reconstruct",
            img.to_str().unwrap(),
            "-c",
            file.to_str().unwrap(),
            "-o",
            dir.join("out.png").to_str().unwrap(),
        ],
    ] {
        let o = run(bin().args(&args));
        let t = text(&o);
        assert!(!o.status.success(), "{args:?}: {t}");
        assert!(
            t.contains("no_expander.safetensors")
                && t.contains("no diffuser.expander.* tensors")
                && t.contains("model.upscales"),
            "{args:?}: {t}"
        );
        assert!(!t.contains("must be positive"), "{args:?}: {t}");
    }
}

#[test]
fn a_run_warm_starts_from_its_own_model_file_and_a_mismatch_names_each_field() {
    let dir = tmpdir("warm-start");
    let data = dir.join("data");
    images(&data);
    let first = config(&dir, &data, "first", 8, None);
    let o = run(bin().args(["train", "--config", first.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    let own = dir.join("first/flxflow_final.safetensors");
    assert!(own.is_file());

    // The same configuration starts from the first run's model file.
    let second = config(&dir, &data, "second", 8, Some(&own));
    let o = run(bin().args(["train", "--config", second.to_str().unwrap()]));
    assert!(o.status.success(), "{}", text(&o));
    assert!(dir.join("second/flxflow_final.safetensors").is_file());

    // Another vae_dim: the file and the one differing field, not two whole structs.
    let third = config(&dir, &data, "third", 16, Some(&own));
    let o = run(bin().args(["train", "--config", third.to_str().unwrap()]));
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("model_checkpoint")
            && t.contains(&own.display().to_string())
            && t.contains("vae_dim: file 8, config 16"),
        "{t}"
    );
    assert!(
        !t.contains("ModelConfig") && !t.contains("vae_attn_heads"),
        "{t}"
    );
    assert!(!dir.join("third/flxflow_final.safetensors").exists());
}
