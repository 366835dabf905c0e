//! The step settings a resumed run trains with: a checkpoint saves the ones its steps ran with,
//! and `run.yaml` (the run's configuration, which a user may edit between sessions) says what
//! to go on with. As the reference, whose resumed trainer takes its loss settings from the
//! configuration, the loss and EMA weights and recomputation follow `run.yaml`; the settings
//! that change what the saved state means (adaptive weighting, SPADE decoding, mixed
//! precision) stay the checkpoint's. Either way a difference is said, never silent.

use crate::train::step::StepConfig;

/// Takes `now`'s (from `run.yaml`) loss and EMA settings into `saved` (from the checkpoint);
/// returns one message per difference, naming the key, both values and which one is used.
pub(super) fn settings_for_resume(saved: &mut StepConfig, now: &StepConfig) -> Vec<String> {
    let mut notes = Vec::new();
    let mut follow = |key: &str, saved: &mut f64, now: f64| {
        // state.json's plain JSON numbers can read back an ulp away from what was written: a
        // difference that small is the same setting (and run.yaml's is the exact one).
        let same = (*saved - now).abs() <= 1e-15 * now.abs().max(saved.abs());
        if !same {
            notes.push(format!(
                "{key} is {now} in run.yaml, {saved} in the checkpoint: training goes on with {now}"
            ));
        }
        *saved = now;
    };
    follow("training.kl_beta", &mut saved.kl_beta, now.kl_beta);
    follow(
        "training.kl_free_bits",
        &mut saved.kl_free_bits,
        now.kl_free_bits,
    );
    follow("training.freq_alpha", &mut saved.freq_alpha, now.freq_alpha);
    follow("training.mse_weight", &mut saved.mse_weight, now.mse_weight);
    follow(
        "training.initial_clipping_norm",
        &mut saved.clip_norm,
        now.clip_norm,
    );
    follow("training.ema_decay", &mut saved.ema_decay, now.ema_decay);
    if saved.kl_warmup_steps != now.kl_warmup_steps {
        notes.push(format!(
            "training.kl_warmup_steps is {} in run.yaml, {} in the checkpoint: training goes on \
             with {}",
            now.kl_warmup_steps, saved.kl_warmup_steps, now.kl_warmup_steps
        ));
        saved.kl_warmup_steps = now.kl_warmup_steps;
    }
    if saved.recompute != now.recompute {
        notes.push(format!(
            "model.use_gradient_checkpointing is {} in run.yaml, {} in the checkpoint: training \
             goes on with {} (it changes memory and time, not results)",
            now.recompute, saved.recompute, now.recompute
        ));
        saved.recompute = now.recompute;
    }
    let kept = [
        (
            "training.adaptive_weights",
            saved.adaptive_weights.to_string(),
            now.adaptive_weights.to_string(),
        ),
        (
            "training.train_spade",
            saved.use_spade.to_string(),
            now.use_spade.to_string(),
        ),
        (
            "training.mixed_precision",
            saved.mixed_precision.to_string(),
            now.mixed_precision.to_string(),
        ),
    ];
    for (key, saved, now) in kept {
        if saved != now {
            notes.push(format!(
                "{key} is {now} in run.yaml, {saved} in the checkpoint: a run cannot change it \
                 part-way, so training goes on with {saved} (start a new run for {now})"
            ));
        }
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_settings_follow_run_yaml_and_state_settings_stay_with_a_note_each() {
        let mut saved = StepConfig::default();
        let now = StepConfig {
            kl_beta: 0.5,
            ema_decay: 0.99,
            use_spade: false,
            ..StepConfig::default()
        };
        let notes = settings_for_resume(&mut saved, &now);
        assert_eq!(saved.kl_beta, 0.5);
        assert_eq!(saved.ema_decay, 0.99);
        assert!(saved.use_spade);
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("training.kl_beta is 0.5 in run.yaml, 0.0001"));
        assert!(notes[2].contains("training.train_spade is false in run.yaml"));
        assert!(settings_for_resume(&mut saved.clone(), &saved).is_empty());
        let off_by_an_ulp = StepConfig {
            kl_beta: f64::from_bits(saved.kl_beta.to_bits() + 1),
            ..saved.clone()
        };
        let mut s = off_by_an_ulp.clone();
        assert!(settings_for_resume(&mut s, &saved).is_empty());
        assert_eq!(s.kl_beta.to_bits(), saved.kl_beta.to_bits());
    }
}
