//! One decoding step of a *ragged* batch: every sequence brings its own number of new tokens
//! (its whole prompt when it joins, one token after that) at its own position, with its own KV
//! cache. This is what lets sequences join and leave between steps (continuous batching), which
//! the model's own [`Gpt2::logits_cached`] cannot do: its cache holds one length for all rows.
//!
//! The N = Σ t_i new tokens of all sequences are laid out as N rows of shape (N, 1, C). Every
//! per-row part of a block (layer norms, the four Linears with the adapter bank's SGMV terms,
//! GELU, residuals) runs once over all N rows; the bank sees N "sequences" of one token, so its
//! per-sequence routing is a per-row routing. Only attention is per sequence, because each
//! attends to its own cache:
//!
//! ```text
//! x = wte[ids] + wpe[positions]                       (N,1,C)  position of row j of seq i: len_i + j
//! per block:
//!     qkv = c_attn(ln_1(x))                           (N,1,3C)
//!     for each sequence i (rows o_i..o_i+t_i):
//!         q, k, v = heads of qkv[o_i..o_i+t_i]         (1,NH,t_i,hs)
//!         cache_i[len_i..len_i+t_i] = k, v
//!         y_i = softmax_causal(q·K_iᵀ·s)·V_i           K_i, V_i: positions 0..len_i+t_i
//!     x = x + attn_c_proj(merge_heads(y))
//!     x = x + mlp_c_proj(act(c_fc(ln_2(x))))
//! logits_i = ln_f(x[o_i + t_i − 1])·Wᵀ                (B,V): the last row of each sequence; W = wte or lm_head
//! ```
//!
//! Each sequence's arithmetic is the one [`transformer::generate()`] does for it alone: the
//! block is the model's own ([`Block::forward_with`]: its variant's activation and attention
//! scale), attention the same ops on the same shapes ([`attend`]), the head the model's (tied
//! or not), and row-wise ops elsewhere.

use autograd::{Tape, Var};
use tensor::ops::slice::{slice_axis, write_axis};
use tensor::{Device, Tensor};
use transformer::model::{Block, attend};
use transformer::{Gpt2, GptConfig};

use crate::Result;

/// The keys and values of one sequence, per layer: (1, NH, capacity, hs) each, filled up to
/// `len`. Its capacity is what the sequence may ever hold (prompt + max_tokens), which is what
/// admission control reserves.
pub struct SeqCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pub len: usize,
    pub capacity: usize,
}

impl SeqCache {
    pub fn new(cfg: &GptConfig, capacity: usize, device: &Device) -> Result<SeqCache> {
        let shape = [1, cfg.n_head, capacity, cfg.n_embd / cfg.n_head];
        let mut k = Vec::with_capacity(cfg.n_layer);
        let mut v = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            k.push(Tensor::zeros(&shape, device)?);
            v.push(Tensor::zeros(&shape, device)?);
        }
        Ok(SeqCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// Bytes one position takes in every layer's K and V: 2 · L · C · 4.
    pub fn bytes_per_position(cfg: &GptConfig) -> u64 {
        2 * cfg.n_layer as u64 * cfg.n_embd as u64 * 4
    }
}

/// One sequence's share of a step: its new token ids and its cache.
pub struct Part<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut SeqCache,
}

/// Runs the new tokens of every part through `model` (see the module doc), appends their keys
/// and values to each part's cache, and returns the logits of each part's last new token:
/// parts.len() × V values on the host, in order.
pub fn step(model: &Gpt2, parts: &mut [Part]) -> Result<Vec<f32>> {
    let cfg = &model.config;
    let c = cfg.n_embd;
    let mut ids = Vec::new();
    let mut positions = Vec::new();
    let mut spans = Vec::with_capacity(parts.len()); // (first row, rows, first position)
    for p in parts.iter() {
        let (t, pos0) = (p.ids.len(), p.cache.len);
        if t == 0 || pos0 + t > p.cache.capacity {
            return Err(format!(
                "{t} new tokens do not fit a sequence cache holding {pos0} of {} positions",
                p.cache.capacity
            )
            .into());
        }
        spans.push((ids.len(), t, pos0));
        ids.extend_from_slice(p.ids);
        positions.extend(pos0 as u32..(pos0 + t) as u32);
    }
    let n = ids.len();
    let tape = Tape::inference();
    let tok = tape.embedding(&tape.param(&model.wte), &ids)?;
    let pos = tape.embedding(&tape.param(&model.wpe), &positions)?;
    let mut x = tape.reshape(&tape.add(&tok, &pos)?, &[n, 1, c])?;
    for (layer, block) in model.h.iter().enumerate() {
        x = block_step(&tape, block, &x, cfg, layer, parts, &spans)?;
    }
    let x = model.ln_f.forward(&tape, &x)?;
    let x = tape.reshape(&x, &[n, c])?;
    let last: Vec<u32> = spans.iter().map(|&(o, t, _)| (o + t - 1) as u32).collect();
    let x = tape.embedding(&x, &last)?; // (B, C)
    let logits = model.head(&tape, &x)?; // (B, V)
    for p in parts.iter_mut() {
        p.cache.len += p.ids.len();
    }
    let host = logits.value.to_vec()?;
    if host.iter().any(|z| z.is_nan()) {
        return Err("the model produced NaN logits".into());
    }
    Ok(host)
}

/// One block over the N rows ([`Block::forward_with`]: the block's own layer norms, Linears,
/// activation and residuals), with attention per sequence against its own cache.
fn block_step(
    tape: &Tape,
    block: &Block,
    x: &Var,
    cfg: &GptConfig,
    layer: usize,
    parts: &[Part],
    spans: &[(usize, usize, usize)],
) -> Result<Var> {
    let (c, nh) = (cfg.n_embd, cfg.n_head);
    let n = x.shape()[0];
    Ok(block.forward_with(tape, x, cfg, |qkv, scale| {
        // qkv: (N,1,3C); y: (N,1,C), filled sequence by sequence.
        let y = Tensor::zeros(&[n, 1, c], &x.value.device())?;
        for (p, &(o, t, pos0)) in parts.iter().zip(spans) {
            let rows = tape.reshape(&tape.slice_axis(qkv, 0, o, t)?, &[1, t, 3 * c])?;
            let q = tape.split_heads(&rows, nh, 0, c)?; // (1,NH,t,hs)
            let k = tape.split_heads(&rows, nh, c, c)?;
            let v = tape.split_heads(&rows, nh, 2 * c, c)?;
            let (ck, cv) = (&p.cache.k[layer], &p.cache.v[layer]);
            write_axis(ck, 2, pos0, &k.value, false)?;
            write_axis(cv, 2, pos0, &v.value, false)?;
            let k = tape.constant(slice_axis(ck, 2, 0, pos0 + t)?);
            let v = tape.constant(slice_axis(cv, 2, 0, pos0 + t)?);
            let out = attend(tape, &q, &k, &v, scale)?; // (1,t,C)
            write_axis(&y, 0, o, &out.value.reshape(&[t, 1, c])?, false)?;
        }
        Ok(tape.constant(y))
    })?)
}
