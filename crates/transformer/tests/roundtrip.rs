//! Round trips: the tokenizers over arbitrary UTF-8 (proptest), and an f16 copy of the fixture
//! model, whose logits must match the f32 model's within what f16 rounding of the weights moves.

use autograd::Tape;
use proptest::prelude::*;
use tensor::Device;
use transformer::{Checkpoint, Gpt2, SaveDtype, Tokenizer};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn gpt2_tokenizer_round_trips_any_utf8(text in "\\PC{0,60}") {
        let tok = Tokenizer::gpt2();
        prop_assert_eq!(tok.decode(&tok.encode(&text)), text);
    }

    #[test]
    fn byte_tokenizer_round_trips_any_utf8(text in "\\PC{0,60}") {
        let tok = Tokenizer::bytes();
        prop_assert_eq!(tok.decode(&tok.encode(&text)), text);
    }
}

#[test]
fn gpt2_tokenizer_gives_known_ids() {
    let tok = Tokenizer::gpt2();
    assert_eq!(tok.encode("Hello world"), [15496, 995]);
    assert_eq!(tok.encode(" the"), [262]);
    assert_eq!(tok.eot(), Some(50256));
}

#[test]
fn an_f16_copy_of_the_fixture_matches_within_f16_rounding() {
    let ckpt = Checkpoint::load(integration_tests::gpt2_tiny::dir()).unwrap();
    let out = integration_tests::scratch("gpt2-tiny-f16");
    ckpt.save_as(&out, SaveDtype::F16).unwrap();
    let half = Checkpoint::load(&out).unwrap();
    // Every weight is its f16 rounding: relative error at most 2⁻¹¹ (f16 has 10 stored bits).
    for ((name, _, a), (_, _, b)) in ckpt.tensors.iter().zip(&half.tensors) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() <= x.abs() * 2f32.powi(-11) + 6e-8,
                "{name}: {x} vs {y}"
            );
        }
    }
    let cpu = Device::cpu();
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 % 256) as u32).collect();
    let logits = |c: &Checkpoint| {
        let m = Gpt2::from_checkpoint(c, &cpu, false).unwrap();
        m.logits(&Tape::inference(), &ids, 1, ids.len())
            .unwrap()
            .value
            .to_vec()
            .unwrap()
    };
    let (full, f16) = (logits(&ckpt), logits(&half));
    let max = full
        .iter()
        .zip(&f16)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = full.iter().map(|a| a.abs()).fold(0.0f32, f32::max);
    println!("f16 weights move the logits by at most {max:.2e} (largest logit {scale:.2})");
    // Two layers of relative 2⁻¹¹ perturbations: well under 1 % of the logits' scale.
    assert!(max < 0.01 * scale, "max diff {max} vs scale {scale}");
}
