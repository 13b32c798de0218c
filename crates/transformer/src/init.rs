//! Initialisation for pretraining from scratch, as GPT-2 does it: every weight matrix and
//! embedding ~ N(0, 0.02²); the two projections that write into the residual stream
//! (attn.c_proj and mlp.c_proj) ~ N(0, (0.02/√(2·L))²), so the residual's variance does not
//! grow with depth (2 residual additions per block, L blocks); biases 0; layer-norm γ 1, β 0.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};

use crate::checkpoint::{Checkpoint, parameter_shapes};
use crate::config::GptConfig;
use crate::error::{Error, Result};

/// Standard deviation of GPT-2's initial weights.
pub const INIT_STD: f32 = 0.02;

/// A freshly initialised checkpoint for `cfg`, reproducible from `seed`.
pub fn init_checkpoint(cfg: &GptConfig, seed: u64) -> Result<Checkpoint> {
    cfg.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let residual_std = INIT_STD / (2.0 * cfg.n_layer as f32).sqrt();
    let mut tensors = Vec::new();
    for (name, shape) in parameter_shapes(cfg) {
        let n: usize = shape.iter().product();
        let values = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains("ln_") {
            vec![1.0; n]
        } else {
            let std = if name.ends_with("c_proj.weight") {
                residual_std
            } else {
                INIT_STD
            };
            let normal = Normal::new(0.0f32, std).map_err(|e| Error::Invalid(format!("{e}")))?;
            (0..n).map(|_| normal.sample(&mut rng)).collect()
        };
        tensors.push((name, shape, values));
    }
    Ok(Checkpoint::new(cfg.clone(), tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_follows_gpt2() {
        let cfg = GptConfig::from_json_str(
            r#"{"n_layer": 8, "n_head": 2, "n_embd": 64, "vocab_size": 256, "n_positions": 32}"#,
        )
        .unwrap();
        let ckpt = init_checkpoint(&cfg, 1).unwrap();
        let std = |name: &str| {
            let (_, v) = ckpt.get(name).unwrap();
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32).sqrt()
        };
        assert!((std("wte.weight") - 0.02).abs() < 0.001);
        assert!((std("h.0.mlp.c_fc.weight") - 0.02).abs() < 0.001);
        // 0.02 / sqrt(2·8) = 0.005
        assert!((std("h.3.mlp.c_proj.weight") - 0.005).abs() < 0.0005);
        assert!((std("h.3.attn.c_proj.weight") - 0.005).abs() < 0.0005);
        assert!(
            ckpt.get("h.1.ln_2.weight")
                .unwrap()
                .1
                .iter()
                .all(|&x| x == 1.0)
        );
        assert!(
            ckpt.get("h.1.attn.c_attn.bias")
                .unwrap()
                .1
                .iter()
                .all(|&x| x == 0.0)
        );
        // reproducible
        assert_eq!(init_checkpoint(&cfg, 1).unwrap().tensors, ckpt.tensors);
    }
}
