//! "Touch only what is yours", through the binary: `train` refuses a folder of files it did not
//! write, `train --force` deletes only its run's own files, no output overwrites an input, the
//! lock is never followed through a link, and a pipe or a device is never read as a file. Each
//! case runs under a time limit and checks that the files it could have destroyed are
//! byte-identical afterwards.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, text};

fn tmpdir(name: &str) -> PathBuf {
    common::fresh_dir("own", name)
}

/// Runs `cmd` to its end, failing the test (and killing the process) after `limit`.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
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
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// `fluxflow ARGS` within a minute.
fn fluxflow(args: &[&str]) -> Output {
    run_within(bin().args(args), Duration::from_secs(60))
}

/// The command failed with every one of `parts` in its message; returns the message.
fn fails_with(o: &Output, parts: &[&str]) -> String {
    let t = text(o);
    assert!(!o.status.success(), "succeeded: {t}");
    for p in parts {
        assert!(t.contains(p), "missing {p:?} in: {t}");
    }
    t
}

/// Every file and link under `dir` (links not followed): relative path -> bytes (a link: its
/// target). What a test compares before and after.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            let t = e.file_type().unwrap();
            if t.is_dir() {
                stack.push(p);
            } else if t.is_symlink() {
                let target = std::fs::read_link(&p).unwrap();
                out.insert(rel, target.to_string_lossy().as_bytes().to_vec());
            } else {
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// [`snapshot`] of a run folder of ours without its lock, which holds the process id of the
/// last command that took it (a refusal under the lock writes its own).
fn snapshot_but_lock(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut s = snapshot(dir);
    s.remove(Path::new(".fluxflow.lock"));
    s
}

/// Asserts that two [`snapshot`]s are equal, naming the paths that differ.
fn assert_same(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
    what: &str,
) {
    let differ: Vec<&PathBuf> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .collect();
    assert!(
        differ.is_empty(),
        "{what}: changed, added or removed: {differ:?}"
    );
}

/// A finished quickstart run of 3 steps in `dir` (checkpoints at steps 2 and 3, samples,
/// graphs, the reference's files at the root).
fn quick_run(dir: &Path) {
    let o = fluxflow(&[
        "train",
        "-o",
        dir.to_str().unwrap(),
        "--max-steps",
        "3",
        "--set",
        "output.checkpoint_save_interval=1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

/// A tiny model's configuration training on the images of `data` into `out`.
fn config_with_data(dir: &Path, data: &Path, out: &Path) -> PathBuf {
    let text = format!(
        "model: {{vae_dim: 8, downscales: 1, feature_maps_dim: 8, text_embedding_dim: 8,
         vae_attn_layers: 1, vae_attn_heads: 2, flow_heads: 2, flow_layers: 1, text_hidden: 8,
         use_gradient_checkpointing: false}}
data:
  data_path: {}
training:
  n_epochs: 1
  batch_size: 2
  workers: 1
output:
  output_path: {}
  checkpoint_save_interval: 2
",
        data.display(),
        out.display()
    );
    let p = dir.join("config.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// `n` 32x32 PNG images in `dir`.
fn images(dir: &Path, n: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, (i * 40) as u8])
        })
        .save(dir.join(format!("img{i}.png")))
        .unwrap();
    }
}

#[test]
fn train_refuses_a_pytorch_reference_run_and_leaves_it_byte_identical() {
    let dir = tmpdir("reference");
    let ours = dir.join("ours");
    quick_run(&ours);
    // A reference run: its model file, training_state.json, lr_sav.json and metrics, no run.yaml.
    let reference = dir.join("reference");
    std::fs::create_dir_all(reference.join("graph")).unwrap();
    for f in [
        "flxflow_final.safetensors",
        "text_encoder.safetensors",
        "training_state.json",
        "lr_sav.json",
        "graph/training_metrics.jsonl",
    ] {
        std::fs::copy(ours.join(f), reference.join(f)).unwrap();
    }
    let before = snapshot(&reference);
    let r = reference.to_str().unwrap();
    for force in [false, true] {
        let mut args = vec!["train", "-o", r, "--max-steps", "1"];
        if force {
            args.push("--force");
        }
        fails_with(
            &fluxflow(&args),
            &[
                "holds files fluxflow did not write",
                "flxflow_final.safetensors",
                "graph/training_metrics.jsonl",
                "lr_sav.json",
                "training_state.json",
                "no run.yaml",
                "name another output folder",
                &format!(
                    "--set model_checkpoint={}",
                    reference.join("flxflow_final.safetensors").display()
                ),
            ],
        );
        assert_same(&before, &snapshot(&reference), &format!("--force {force}"));
    }
    // resume agrees that it is no run of ours, and says what is there.
    fails_with(
        &fluxflow(&["resume", "-o", r]),
        &[
            "holds no fluxflow run",
            "no run.yaml",
            "flxflow_final.safetensors",
            "model_checkpoint",
        ],
    );
    assert_same(&before, &snapshot(&reference), "");
    // Its model file is read as a source, in another folder.
    let model = reference.join("flxflow_final.safetensors");
    let o = fluxflow(&[
        "train",
        "-o",
        dir.join("warm").to_str().unwrap(),
        "--max-steps",
        "1",
        "--set",
        &format!("model_checkpoint={}", model.display()),
        // The heads are not readable from the tensor shapes: the checkpoint's are assumed.
        "--set",
        "model.vae_attn_heads=8",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_same(&before, &snapshot(&reference), "");
}

#[test]
fn train_refuses_a_folder_holding_a_users_own_files() {
    let dir = tmpdir("user-files");
    let ours = dir.join("ours");
    quick_run(&ours);
    let bare = dir.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(
        ours.join("flxflow_final.safetensors"),
        bare.join("flxflow_final.safetensors"),
    )
    .unwrap();
    let notes = dir.join("notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("README.md"), "my notes\n").unwrap();
    for (folder, model_hint) in [(&bare, true), (&notes, false)] {
        let before = snapshot(folder);
        for force in [false, true] {
            let mut args = vec!["train", "-o", folder.to_str().unwrap(), "--max-steps", "1"];
            if force {
                args.push("--force");
            }
            let t = fails_with(
                &fluxflow(&args),
                &["did not write", "name another output folder"],
            );
            assert_eq!(t.contains("model_checkpoint"), model_hint, "{t}");
            assert_same(&before, &snapshot(folder), &folder.display().to_string());
        }
    }
}

#[test]
fn an_empty_folder_or_one_holding_only_what_a_run_wrote_is_accepted() {
    let dir = tmpdir("accepted");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = fluxflow(&["train", "-o", empty.to_str().unwrap(), "--max-steps", "1"]);
    assert!(o.status.success(), "{}", text(&o));
    // What a run leaves before its run.yaml (a run stopped while it prepared): the lock, the
    // bucket cache, the generated data and empty folders.
    let early = dir.join("early");
    quick_run(&dir.join("full"));
    std::fs::create_dir_all(early.join("graph")).unwrap();
    std::fs::create_dir_all(early.join("samples")).unwrap();
    std::fs::create_dir_all(early.join("checkpoints")).unwrap();
    for e in std::fs::read_dir(dir.join("full")).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".dimensions.json") || name == ".fluxflow.lock" {
            std::fs::copy(e.path(), early.join(&name)).unwrap();
        }
    }
    let o = Command::new("cp")
        .arg("-r")
        .arg(dir.join("full/synthetic-data"))
        .arg(&early)
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = fluxflow(&["train", "-o", early.to_str().unwrap(), "--max-steps", "1"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn force_deletes_only_the_files_of_the_runs_own_manifest() {
    let dir = tmpdir("force");
    let run = dir.join("run");
    quick_run(&run);
    let foreign: [(&str, &[u8]); 6] = [
        ("NOTES.md", b"my notes"),
        ("README", b"read me"),
        ("samples/kept/photo.png", b"not even a png"),
        (
            "samples/synthetic_00000/my-favourite.png",
            b"a picked sample",
        ),
        ("checkpoints/best-model.safetensors", b"kept by hand"),
        ("graph/notes.txt", b"remarks"),
    ];
    for (f, bytes) in foreign {
        let p = run.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    let r = run.to_str().unwrap();
    // Without --force: refused, nothing changes.
    let before = snapshot_but_lock(&run);
    fails_with(
        &fluxflow(&["train", "-o", r, "--max-steps", "1"]),
        &["already holds a run", "--force", "resume"],
    );
    assert_same(&before, &snapshot_but_lock(&run), "");
    let o = fluxflow(&["train", "-o", r, "--max-steps", "1", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("kept 6 file(s) fluxflow did not write"),
        "{}",
        text(&o)
    );
    for (f, bytes) in foreign {
        assert_eq!(std::fs::read(run.join(f)).unwrap(), bytes, "{f}");
    }
    // The old run's files went; the new run's are there.
    assert!(!run.join("checkpoints/step-00000003").exists());
    assert!(!run.join("checkpoints/step-00000002").exists());
    assert!(!run.join("samples/synthetic_00000/00003.webp").exists());
    assert!(run.join("checkpoints/step-00000001/state.json").exists());
    assert!(run.join("run.yaml").exists());
    let metrics = std::fs::read_to_string(run.join("graph/training_metrics.jsonl")).unwrap();
    assert!(!metrics.contains("\"global_step\":3"), "old rows kept");
    // A folder left empty is removed, one holding foreign files stays.
    let contents = fluxflow::run::dir::own::inspect(&run).unwrap();
    assert_eq!(
        contents.foreign.len(),
        6,
        "{:?}",
        contents.foreign.iter().collect::<Vec<_>>()
    );
}

#[test]
fn a_finished_run_holds_only_files_it_knows_as_its_own() {
    let dir = tmpdir("known");
    let run = dir.join("run");
    quick_run(&run);
    let c = fluxflow::run::dir::own::inspect(&run).unwrap();
    assert!(c.is_run());
    assert!(c.foreign.is_empty(), "unknown files: {:?}", c.foreign);
    assert!(c.run_files.len() > 20, "{:?}", c.run_files);
}

#[test]
fn train_and_force_refuse_a_data_folder_and_an_output_folder_that_overlap() {
    let dir = tmpdir("overlap");
    let data = dir.join("data");
    images(&data, 4);
    let configs = tmpdir("overlap-configs");
    let before = snapshot(&dir);
    for out in [data.clone(), data.join("out"), dir.clone()] {
        let cfg = config_with_data(&configs, &data, &out);
        for force in [false, true] {
            let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
            if force {
                args.push("--force");
            }
            fails_with(
                &fluxflow(&args),
                &[
                    "overlap",
                    &format!("data folder {}", data.display()),
                    &format!("output folder {}", out.display()),
                ],
            );
            assert_same(&before, &snapshot(&dir), &format!("-o {}", out.display()));
        }
    }
}

#[test]
fn reconstruct_refuses_an_output_that_is_its_image_or_its_checkpoint() {
    let dir = tmpdir("reconstruct");
    let run = dir.join("run");
    quick_run(&run);
    let img = dir.join("img.png");
    std::fs::copy(run.join("synthetic-data/synthetic_00000.png"), &img).unwrap();
    let ckpt = run.join("flxflow_final.safetensors");
    let link = dir.join("link.png");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let before = snapshot(&dir);
    let i = img.to_str().unwrap();
    let c = ckpt.to_str().unwrap();
    let same_image = dir.join("sub/../img.png");
    for (out, what) in [
        (i, "the image to reconstruct"),
        (same_image.to_str().unwrap(), "the image to reconstruct"),
        (link.to_str().unwrap(), "the image to reconstruct"),
        (c, "the checkpoint"),
    ] {
        fails_with(
            &fluxflow(&["reconstruct", i, "--checkpoint", c, "-o", out]),
            &[&format!("-o {out}"), what, "name another output file"],
        );
        assert_same(&before, &snapshot(&dir), &format!("-o {out}"));
    }
    let o = fluxflow(&[
        "reconstruct",
        i,
        "--checkpoint",
        c,
        "-o",
        dir.join("out.png").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn eval_json_refuses_an_image_of_the_data_folder_and_the_checkpoint() {
    let dir = tmpdir("eval-json");
    let run = dir.join("run");
    quick_run(&run);
    let data = dir.join("data");
    images(&data, 2);
    let ckpt = run.join("flxflow_final.safetensors");
    let before = snapshot(&dir);
    let (d, c) = (data.to_str().unwrap(), ckpt.to_str().unwrap());
    for (json, what) in [
        (data.join("img0.png"), "an image of the data folder"),
        (data.join("new.png"), "an image of the data folder"),
        (ckpt.clone(), "the checkpoint being evaluated"),
        (
            run.join("text_encoder.safetensors"),
            "the text projection file",
        ),
    ] {
        let j = json.to_str().unwrap();
        fails_with(
            &fluxflow(&["eval", "--checkpoint", c, "--data", d, "--json", j]),
            &[&format!("--json {j}"), what],
        );
        assert_same(&before, &snapshot(&dir), &format!("--json {j}"));
    }
    let o = fluxflow(&[
        "eval",
        "--checkpoint",
        c,
        "--data",
        d,
        "--json",
        data.join("scores.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched() {
    let dir = tmpdir("lock-link");
    let run = dir.join("run");
    quick_run(&run);
    let target = dir.join("precious.txt");
    std::fs::write(&target, "do not overwrite").unwrap();
    let lock = run.join(".fluxflow.lock");
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(&target, &lock).unwrap();
    let before = snapshot(&dir);
    let r = run.to_str().unwrap();
    for args in [
        vec!["resume", "-o", r],
        vec!["train", "-o", r, "--force", "--max-steps", "1"],
    ] {
        fails_with(
            &fluxflow(&args),
            &[
                &format!("the lock file {}", lock.display()),
                "is a symbolic link",
                &target.display().to_string(),
            ],
        );
        assert_same(&before, &snapshot(&dir), &format!("{args:?}"));
    }
    // In a folder that holds no run, the link is a file fluxflow did not write.
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::os::unix::fs::symlink(&target, other.join(".fluxflow.lock")).unwrap();
    let before = snapshot(&dir);
    fails_with(
        &fluxflow(&["train", "-o", other.to_str().unwrap(), "--max-steps", "1"]),
        &[".fluxflow.lock", "did not write"],
    );
    assert_same(&before, &snapshot(&dir), "");
}

#[test]
fn train_and_resume_agree_on_a_run_folder_without_run_yaml() {
    let dir = tmpdir("no-run-yaml");
    let run = dir.join("run");
    quick_run(&run);
    std::fs::remove_file(run.join("run.yaml")).unwrap();
    let snap = || snapshot_but_lock(&run);
    let before = snap();
    let r = run.to_str().unwrap();
    let what = [
        "holds an unfinished fluxflow run",
        "2 checkpoint folder(s), the newest checkpoints/step-00000003",
        "but no run.yaml",
    ];
    let t = fails_with(&fluxflow(&["train", "-o", r, "--max-steps", "1"]), &what);
    assert!(t.contains("--force"), "{t}");
    assert_same(&before, &snap(), "");
    let t = fails_with(&fluxflow(&["resume", "-o", r]), &what);
    assert!(
        t.contains(&format!(
            "{}, which is missing",
            run.join("run.yaml").display()
        )),
        "{t}"
    );
    assert_same(&before, &snap(), "");
    // --force starts over there.
    let o = fluxflow(&["train", "-o", r, "--max-steps", "1", "--force"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn a_named_pipe_or_a_device_is_not_a_regular_file_for_any_command() {
    let dir = tmpdir("not-regular");
    let run = dir.join("run");
    quick_run(&run);
    let pipe = dir.join("pipe.safetensors");
    let o = Command::new("mkfifo").arg(&pipe).output().unwrap();
    assert!(o.status.success(), "mkfifo: {}", text(&o));
    let img = run.join("synthetic-data/synthetic_00000.png");
    let ckpt = run.join("flxflow_final.safetensors");
    let p = pipe.to_str().unwrap();
    let (i, c) = (img.to_str().unwrap(), ckpt.to_str().unwrap());
    let out = dir.join("out.png");
    let o_ = out.to_str().unwrap();
    let data = run.join("synthetic-data");
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (vec!["info", p], p, "a named pipe"),
        (vec!["info", "/dev/zero"], "/dev/zero", "a character device"),
        (
            vec!["reconstruct", p, "--checkpoint", c, "-o", o_],
            p,
            "a named pipe",
        ),
        (
            vec!["reconstruct", "/dev/zero", "--checkpoint", c, "-o", o_],
            "/dev/zero",
            "a character device",
        ),
        (
            vec!["reconstruct", i, "--checkpoint", "/dev/zero", "-o", o_],
            "/dev/zero",
            "a character device",
        ),
        (
            vec!["eval", "--checkpoint", p, "--data", data.to_str().unwrap()],
            p,
            "a named pipe",
        ),
    ];
    for (args, path, kind) in cases {
        let t = fails_with(
            &fluxflow(&args),
            &[&format!("{path} is not a regular file: it is {kind}")],
        );
        assert!(!t.contains("is empty"), "{t}");
    }
    let warm = format!("model_checkpoint={p}");
    fails_with(
        &fluxflow(&[
            "train",
            "-o",
            dir.join("warm").to_str().unwrap(),
            "--set",
            &warm,
        ]),
        &[&format!("{p} is not a regular file: it is a named pipe")],
    );
    assert!(!out.exists());
}
