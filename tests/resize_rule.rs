//! The training-size rule against the reference pipeline's table.

mod common;

use fluxflow::resize_rule::training_size;

#[test]
fn training_sizes_match_the_reference_table() {
    let text = std::fs::read_to_string(common::parity("resize-rule.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rows = v["resize"].as_array().unwrap();
    assert!(rows.len() > 20);
    for row in rows {
        let inp: [u32; 2] = serde_json::from_value(row["in"].clone()).unwrap();
        let out: [u32; 2] = serde_json::from_value(row["out"].clone()).unwrap();
        assert_eq!(
            training_size(inp[0], inp[1]),
            (out[0], out[1]),
            "training size of {inp:?}"
        );
    }
}
