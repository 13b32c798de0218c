//! AdamW's parameter groups for `train finetune`: decoupled weight decay (`--weight-decay`)
//! and LoRA+'s learning rates (`--lora-plus-ratio`).
//!
//! | parameters | learning rate | weight decay |
//! |---|---|---|
//! | `lora_A`, and the matrices of `modules_to_save` | lr | wd |
//! | `lora_B`, DoRA's magnitudes | ratio · lr | wd |
//! | biases, layer norms | ratio · lr | 0 |
//! | `--full`: every weight | lr | wd |
//!
//! LoRA+ (Hayou et al. 2024) gives B a learning rate `ratio` times A's; PEFT's
//! `create_loraplus_optimizer` puts every one-dimensional parameter in B's group too, and, as
//! Hugging Face's Trainer does, exempts biases and layer norms from weight decay. With ratio 1
//! and no bias or layer norm this is one group of every parameter in order, as before these
//! options.
//!
//! AdamW's decay is decoupled (Loshchilov & Hutter): p ← p − lr·wd·p, apart from the
//! moments, so a parameter without gradient still shrinks by the factor (1 − lr·wd).

use autograd::{ParamGroup, Trainable};

/// The groups for `params` (names as [`lora::LoraModel::trainable_params`] gives them), in the
/// order of first appearance, each keeping its parameters' order.
pub fn param_groups(params: &[Trainable], weight_decay: f32, ratio: f32) -> Vec<ParamGroup> {
    let mut groups: Vec<ParamGroup> = Vec::new();
    for p in params {
        let one_dim = p.value.shape().len() == 1;
        let lr_scale = if p.name.ends_with(".lora_B") || one_dim {
            ratio
        } else {
            1.0
        };
        let decay = if exempt_from_decay(&p.name) {
            0.0
        } else {
            weight_decay
        };
        match groups
            .iter_mut()
            .find(|g| g.lr_scale == lr_scale && g.weight_decay == decay)
        {
            Some(g) => g.params.push(p.clone()),
            None => groups.push(ParamGroup {
                params: vec![p.clone()],
                lr_scale,
                weight_decay: decay,
            }),
        }
    }
    groups
}

/// Biases and layer norms' parameters (`h.0.ln_1.weight`, `ln_f.bias`): not decayed.
fn exempt_from_decay(name: &str) -> bool {
    let module = name.rsplit_once('.').map_or("", |(m, _)| m);
    let last = module.rsplit('.').next().unwrap_or(module);
    name.ends_with(".bias") || last.starts_with("ln_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use autograd::{AdamW, Grads, Param};
    use tensor::{Device, Tensor};

    fn param(name: &str, shape: &[usize], v: f32) -> Param {
        let n = shape.iter().product();
        Param::trainable(
            name,
            Tensor::from_vec(vec![v; n], shape, &Device::cpu()).unwrap(),
        )
    }

    /// One AdamW step with gradient `g` everywhere; the parameters after it.
    fn one_step(params: &[Param], g: f32, lr: f32, wd: f32, ratio: f32) -> Vec<f32> {
        let trainables: Vec<Trainable> = params
            .iter()
            .map(|p| p.as_trainable().unwrap().clone())
            .collect();
        let mut opt = AdamW::new(param_groups(&trainables, wd, ratio));
        let mut grads = Grads::new();
        for t in &trainables {
            let n = t.value.numel();
            let grad = Tensor::from_vec(vec![g; n], t.value.shape(), &Device::cpu()).unwrap();
            grads.set(t.id, grad);
        }
        opt.step(&grads, lr).unwrap();
        params
            .iter()
            .map(|p| p.value().to_vec().unwrap()[0])
            .collect()
    }

    #[test]
    fn lora_plus_moves_b_ratio_times_as_far_as_a() {
        let params = [
            param("h.0.attn.c_attn.lora_A", &[2, 3], 1.0),
            param("h.0.attn.c_attn.lora_B", &[4, 2], 1.0),
            param("h.0.ln_1.bias", &[3], 1.0),
        ];
        // Adam's first step moves every coordinate by lr (m̂/√v̂ = ±1), times the group's factor.
        let after = one_step(&params, 0.5, 1e-3, 0.0, 16.0);
        let moved: Vec<f32> = after.iter().map(|v| 1.0 - v).collect();
        assert!((moved[0] - 1e-3).abs() < 1e-7, "{moved:?}");
        assert!((moved[1] - 16e-3).abs() < 1e-6, "{moved:?}");
        assert!((moved[2] - 16e-3).abs() < 1e-6, "{moved:?}");
    }

    #[test]
    fn weight_decay_shrinks_matrices_but_not_biases() {
        let params = [
            param("h.0.attn.c_attn.lora_A", &[2, 3], 2.0),
            param("h.0.attn.c_attn.lora_B", &[4, 2], 2.0),
            param("h.0.ln_1.bias", &[3], 2.0),
            param("ln_f.weight", &[3], 2.0),
            param("h.0.attn.c_attn.lora_magnitude_vector", &[3], 2.0),
        ];
        // A zero gradient: Adam moves nothing, the decay alone gives p·(1 − lr·wd).
        let after = one_step(&params, 0.0, 0.1, 0.5, 1.0);
        let decayed = 2.0 * (1.0 - 0.1 * 0.5);
        assert!((after[0] - decayed).abs() < 1e-6, "{after:?}");
        assert!((after[1] - decayed).abs() < 1e-6, "{after:?}");
        assert_eq!((after[2], after[3]), (2.0, 2.0));
        assert!((after[4] - decayed).abs() < 1e-6, "{after:?}");
    }

    #[test]
    fn plain_lora_keeps_one_group_in_order() {
        let params = [
            param("a.lora_A", &[2, 2], 0.0),
            param("a.lora_B", &[2, 2], 0.0),
            param("b.lora_A", &[2, 2], 0.0),
        ];
        let t: Vec<Trainable> = params
            .iter()
            .map(|p| p.as_trainable().unwrap().clone())
            .collect();
        let groups = param_groups(&t, 0.01, 1.0);
        assert_eq!(groups.len(), 1);
        let names: Vec<&str> = groups[0].params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a.lora_A", "a.lora_B", "b.lora_A"]);
        assert_eq!(param_groups(&t, 0.01, 4.0).len(), 2);
    }
}
