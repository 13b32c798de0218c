//! The attention core of a block: from qkv = ln_1(x)·c_attn.W + c_attn.b (B, T, 3C) to the
//! heads' outputs merged back, (B, T, C):
//!
//!   y = merge_heads(softmax_causal(q·kᵀ·s)·v),  q, k, v the heads of qkv's column thirds.
//!
//! Without a KV cache (training, evaluation, full-sequence logits) this is the tape's fused
//! [`Tape::causal_attention`]: q, k and v are read from qkv in place and no (B, NH, T, T)
//! tensor exists, forward or backward. With a cache (decoding), the queries of this step attend
//! to the cached positions as well; that path splits the heads, appends k and v to the cache
//! and runs [`attend`], the unfused composition of tape ops, which is also the oracle the fused
//! op is tested against.

use autograd::{Tape, Var};
use tensor::Tensor;
use tensor::ops::matmul::MatmulOpts;
use tensor::ops::slice::{slice_axis, write_axis};

use crate::error::Result;

/// The attention of `nh` heads over qkv (B, T, 3C) with scores scaled by `scale`, attending
/// also to the positions of a layer cache (k, v, first position) when one is given; this
/// step's k and v are then appended to it.
pub fn self_attention(
    tape: &Tape,
    qkv: &Var,
    nh: usize,
    scale: f32,
    cache: Option<(&Tensor, &Tensor, usize)>,
) -> Result<Var> {
    let Some((ck, cv, pos)) = cache else {
        return Ok(tape.causal_attention(qkv, nh, scale)?);
    };
    let c = qkv.shape()[2] / 3;
    let q = tape.split_heads(qkv, nh, 0, c)?; // (B,NH,T,hs)
    let k = tape.split_heads(qkv, nh, c, c)?;
    let v = tape.split_heads(qkv, nh, 2 * c, c)?;
    // Keys and values cover positions 0..pos+T and the causal mask lets row t see columns up
    // to pos + t (softmax masks c > r + (columns − rows)).
    let (k, v) = cached_kv(&k, &v, ck, cv, pos, tape)?;
    attend(tape, &q, &k, &v, scale)
}

/// Append this step's k, v (B,NH,T,hs) at position `pos` of a layer's cache and return the
/// keys and values of positions 0..pos+T.
fn cached_kv(
    k: &Var,
    v: &Var,
    ck: &Tensor,
    cv: &Tensor,
    pos: usize,
    tape: &Tape,
) -> Result<(Var, Var)> {
    write_axis(ck, 2, pos, &k.value, false)?;
    write_axis(cv, 2, pos, &v.value, false)?;
    let t = pos + k.shape()[2];
    Ok((
        tape.constant(slice_axis(ck, 2, 0, t)?),
        tape.constant(slice_axis(cv, 2, 0, t)?),
    ))
}

/// merge_heads(softmax_causal(q·kᵀ·scale)·v): q (B,NH,T,hs), k and v (B,NH,T',hs) with T' ≥ T
/// (the last T of T' positions are q's) → (B,T,C). Unfused: it forms the (B,NH,T,T') scores.
pub fn attend(tape: &Tape, q: &Var, k: &Var, v: &Var, scale: f32) -> Result<Var> {
    let scores = tape.matmul(
        q,
        k,
        None,
        MatmulOpts {
            trans_a: false,
            trans_b: true,
        },
    )?; // (B,NH,T,T')
    let scores = tape.scale(&scores, scale)?;
    let att = tape.softmax(&scores, true)?;
    let y = tape.matmul(&att, v, None, MatmulOpts::default())?; // (B,NH,T,hs)
    Ok(tape.merge_heads(&y)?) // (B,T,C)
}

#[cfg(test)]
mod tests {
    use super::*;
    use autograd::{Grads, Param};
    use proptest::prelude::*;
    use tensor::Device;
    use tensor::testing::{assert_close, gpu, random};

    /// y and d(qkv) of L = Σ r ⊙ y, by the fused op (`fused`) or the unfused oracle.
    fn run(qkv: &Tensor, r: &Tensor, nh: usize, scale: f32, fused: bool) -> (Tensor, Tensor) {
        let p = Param::trainable("qkv", qkv.clone());
        let tape = Tape::new();
        let x = tape.param(&p);
        let y = if fused {
            tape.causal_attention(&x, nh, scale).unwrap()
        } else {
            let c = qkv.shape()[2] / 3;
            let [q, k, v] = [0, c, 2 * c].map(|col0| tape.split_heads(&x, nh, col0, c).unwrap());
            attend(&tape, &q, &k, &v, scale).unwrap()
        };
        let loss = tape
            .sum_all(&tape.mul(&y, &tape.constant(r.clone())).unwrap())
            .unwrap();
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap();
        let g = grads.get(p.as_trainable().unwrap().id).unwrap().clone();
        (y.value, g)
    }

    /// Fused against unfused on `device`: y and d(qkv) to 2e-5 absolute + 1e-4 relative (both
    /// are f32; they differ only in the order of the sums and the exp used).
    fn check(shape: [usize; 4], scale: f32, seed: u64, device: &Device) {
        let [b, t, nh, hs] = shape;
        let qkv = random(&[b, t, 3 * nh * hs], seed, device);
        let r = random(&[b, t, nh * hs], seed + 1, device);
        let (y, g) = run(&qkv, &r, nh, scale, true);
        let (want_y, want_g) = run(&qkv, &r, nh, scale, false);
        assert_close(&format!("{shape:?} y"), &y, &want_y, 2e-5, 1e-4);
        assert_close(&format!("{shape:?} dqkv"), &g, &want_g, 2e-5, 1e-4);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn fused_matches_unfused_cpu(b in 1usize..3, t in 1usize..70, nh in 1usize..4,
                                     hs in 1usize..=20, seed in 0u64..1000) {
            check([b, t, nh, hs], (hs as f32).powf(-0.5), seed, &Device::cpu());
        }

        #[test]
        fn fused_matches_unfused_gpu(b in 1usize..3, t in 1usize..35, nh in 1usize..3,
                                     hs in 1usize..=20, seed in 0u64..1000) {
            let Some(g) = gpu() else { return Ok(()) };
            check([b, t, nh, hs], (hs as f32).powf(-0.5), seed, &g);
        }
    }

    #[test]
    fn gpt2_head_width_and_layer_scales() {
        // hs = 64 as in every GPT-2, and the scales of scale_attn_by_inverse_layer_idx (÷ 3)
        // and of scale_attn_weights = false (1).
        for (scale, seed) in [(0.125 / 3.0, 1), (1.0, 2)] {
            check([1, 20, 2, 64], scale, seed, &Device::cpu());
        }
    }
}
