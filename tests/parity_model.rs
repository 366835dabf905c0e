//! The candle model against the PyTorch reference's outputs in tests/fixtures/tiny16.*.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, parity, tiny16};
use fluxflow::model::{BezierActivation, FluxModel, Noise, PreAct};
use fluxflow::weights::load_model;

fn fixture(name: &str, dtype: DType) -> Tensor {
    tiny16()
        .remove(&format!("fixture.{name}"))
        .unwrap_or_else(|| panic!("fixture.{name} in tiny16.safetensors"))
        .to_dtype(dtype)
        .unwrap()
}

fn load(dtype: DType) -> FluxModel {
    load_model(&parity("tiny16.safetensors"), dtype, &Device::Cpu)
        .expect("tiny16 loads")
        .model
}

fn check_bezier(dtype: DType, tol: f64) {
    let x = fixture("bezier_in", dtype);
    let cases = [
        ("bezier_sigmoid_silu", PreAct::Sigmoid, PreAct::Silu),
        ("bezier_sigmoid_none", PreAct::Sigmoid, PreAct::None),
        ("bezier_silu_tanh", PreAct::Silu, PreAct::Tanh),
        ("bezier_none_none", PreAct::None, PreAct::None),
    ];
    for (name, t, p) in cases {
        let y = BezierActivation::new(t, p).forward(&x).unwrap();
        assert_close(name, &y, &fixture(name, dtype), tol);
    }
}

fn check_model(dtype: DType, tol: f64) {
    let m = load(dtype);
    let image = fixture("image", dtype);
    let eps = fixture("eps", dtype);
    let enc = m.compressor.forward(&image, Noise::Given(&eps)).unwrap();
    assert_close("mu", &enc.mu, &fixture("mu", dtype), tol);
    assert_close("logvar", &enc.logvar, &fixture("logvar", dtype), tol);
    assert_close("packed", &enc.packed, &fixture("packed", dtype), tol);

    let mean = m.compressor.forward(&image, Noise::Mean).unwrap();
    assert_close(
        "packed_mean",
        &mean.packed,
        &fixture("packed_mean", dtype),
        tol,
    );

    let ctx = m.expander.forward(&enc.packed, true).unwrap();
    assert_close("recon_ctx", &ctx, &fixture("recon_ctx", dtype), tol);
    let noctx = m.expander.forward(&enc.packed, false).unwrap();
    assert_close("recon_noctx", &noctx, &fixture("recon_noctx", dtype), tol);
    let rmean = m.expander.forward(&mean.packed, true).unwrap();
    assert_close("recon_mean", &rmean, &fixture("recon_mean", dtype), tol);

    let flow = m
        .flow_processor
        .forward(
            &fixture("packed", dtype),
            &fixture("flow_text", dtype),
            &fixture("flow_t", dtype),
        )
        .unwrap();
    assert_close("flow_out", &flow, &fixture("flow_out", dtype), tol);

    let text = m.text.forward(&fixture("text_hidden", dtype)).unwrap();
    assert_close("text_out", &text, &fixture("text_out", dtype), tol);
}

#[test]
fn bezier_variants_match_reference_f64() {
    check_bezier(DType::F64, 1e-7);
}

#[test]
fn bezier_variants_match_reference_f32() {
    check_bezier(DType::F32, 1e-4);
}

#[test]
fn every_fixture_output_matches_reference_f64() {
    check_model(DType::F64, 1e-7);
}

#[test]
fn every_fixture_output_matches_reference_f32() {
    check_model(DType::F32, 1e-4);
}
