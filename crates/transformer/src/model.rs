//! GPT-2's modules on the autograd tape: [`Linear`] (Conv1D layout), [`LayerNorm`], the
//! attention and MLP of a [`Block`], and the whole [`Gpt2`].
//!
//! Forward for training, per block (pre-norm, as GPT-2):
//! ```text
//! x = wte[ids] + wpe[0..T]                                  (B,T,C)
//! for each block:
//!     qkv = ln_1(x)·c_attn.W + c_attn.b                     (B,T,3C)
//!     q, k, v = heads of columns [0,C), [C,2C), [2C,3C)     (hs = C/NH wide)
//!     y = softmax_causal(q·kᵀ · s_i)·v, heads merged        (B,T,C), fused (crate::attention)
//!     x = x + y·c_proj.W + c_proj.b                         (B,T,C)
//!     x = x + act(ln_2(x)·c_fc.W + c_fc.b)·mlp.c_proj.W + mlp.c_proj.b   (via (B,T,F))
//! logits = ln_f(x)·wteᵀ                                     (B·T,V)
//! ```
//! GPT-2's own choices, which a `config.json` may change ([`crate::Variant`]): act = GELU (tanh
//! form), F = 4C, s_i = 1/√hs for every block i, and the head tied to `wte` (untied: `lm_head`).

use autograd::{Param, Tape, Var};
use tensor::ops::matmul::MatmulOpts;
use tensor::{Device, Tensor};

pub use crate::attention::attend;
use crate::attention::self_attention;
use crate::checkpoint::{Checkpoint, LM_HEAD, parameter_shapes};
use crate::config::GptConfig;
use crate::error::{Error, Result};
use crate::token_adapter::TokenAdapter;

pub use crate::linear::{Adapter, F16Linear, Linear, Nf4Linear, Weight};

/// Layer norm over C with learned γ (weight) and β (bias).
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f32,
}

impl LayerNorm {
    pub fn forward(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let (g, b) = (tape.param(&self.weight), tape.param(&self.bias));
        Ok(tape.layernorm(x, &g, &b, self.eps)?)
    }

    /// The stream's value and its layer norm. A [`Residual::Sum`] is added by the layer norm's
    /// own kernel ([`Tape::add_layernorm`]), so no addition kernel runs.
    pub fn forward_residual(&self, tape: &Tape, x: Residual) -> Result<(Var, Var)> {
        match x {
            Residual::Value(x) => {
                let y = self.forward(tape, &x)?;
                Ok((x, y))
            }
            Residual::Sum(x, a) => {
                let (g, b) = (tape.param(&self.weight), tape.param(&self.bias));
                Ok(tape.add_layernorm(&x, &a, &g, &b, self.eps)?)
            }
        }
    }
}

/// The residual stream between two sublayers: a value, or the sum `x + a` of the stream and a
/// sublayer's output not added yet. Every such sum in GPT-2 (the embeddings, each residual) is
/// read next by a layer norm, which adds it in its own kernel ([`LayerNorm::forward_residual`]).
#[derive(Clone, Debug)]
pub enum Residual {
    Value(Var),
    Sum(Var, Var),
}

impl Residual {
    /// The stream as a value (adds a pending sum).
    pub fn value(self, tape: &Tape) -> Result<Var> {
        match self {
            Residual::Value(x) => Ok(x),
            Residual::Sum(x, a) => Ok(tape.add(&x, &a)?),
        }
    }
}

/// One transformer block: attention and MLP, each behind a layer norm and a residual.
pub struct Block {
    /// Its index i in `h.{i}` (the attention scale may depend on it).
    pub layer: usize,
    pub ln_1: LayerNorm,
    pub c_attn: Linear,
    pub attn_c_proj: Linear,
    pub ln_2: LayerNorm,
    pub c_fc: Linear,
    pub mlp_c_proj: Linear,
}

/// GPT-2: embeddings, blocks, final norm; the output head is the token embedding (tied), or
/// `lm_head` when the config unties it.
pub struct Gpt2 {
    pub config: GptConfig,
    pub wte: Param,
    pub wpe: Param,
    pub h: Vec<Block>,
    pub ln_f: LayerNorm,
    /// The untied output head (V, C); `None` when tied to `wte`.
    pub lm_head: Option<Param>,
    /// An adapter on the input rows `wte[ids]` and/or the output head (LoRA on `wte`, `lm_head`).
    pub token_adapter: Option<Box<dyn TokenAdapter>>,
}

/// Keys and values of the positions seen so far, per layer: (B, NH, T_max, hs) each, filled up to
/// `len`. Inference reuses them so each new token costs one position of work, not T.
pub struct KvCache {
    pub k: Vec<Tensor>,
    pub v: Vec<Tensor>,
    /// Positions filled.
    pub len: usize,
    /// Capacity (the model's context).
    pub max: usize,
}

impl KvCache {
    /// An empty cache for `b` sequences on `device`.
    pub fn new(cfg: &GptConfig, b: usize, device: &Device) -> Result<KvCache> {
        let shape = [b, cfg.n_head, cfg.n_positions, cfg.n_embd / cfg.n_head];
        let mut k = Vec::with_capacity(cfg.n_layer);
        let mut v = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            k.push(Tensor::zeros(&shape, device)?);
            v.push(Tensor::zeros(&shape, device)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            max: cfg.n_positions,
        })
    }

    pub fn batch(&self) -> usize {
        self.k.first().map_or(0, |t| t.shape()[0])
    }
}

impl Block {
    /// x: (B,T,C) → (B,T,C).
    pub fn forward(&self, tape: &Tape, x: &Var, cfg: &GptConfig) -> Result<Var> {
        self.forward_cached(tape, x, cfg, None)
    }

    /// The same, attending also to the cached positions when a layer cache (k, v, first
    /// position) is given; this step's k and v are appended to it.
    pub fn forward_cached(
        &self,
        tape: &Tape,
        x: &Var,
        cfg: &GptConfig,
        cache: Option<(&Tensor, &Tensor, usize)>,
    ) -> Result<Var> {
        self.forward_with(tape, x, cfg, |qkv, scale| {
            self_attention(tape, qkv, cfg.n_head, scale, cache)
        })
    }

    /// The block with its attention core given by `attention`: called with
    /// qkv = ln_1(x)·c_attn.W + c_attn.b (…, 3C) and this block's attention scale s_i, it
    /// returns the heads merged back, merge_heads(att·v) (…, C). Everything else (layer norms,
    /// the four Linears with their adapters, the activation, the residuals) is the block's own.
    /// [`Block::forward_cached`] attends over one cache for the whole batch; a server whose
    /// sequences each have their own cache brings its own core.
    pub fn forward_with(
        &self,
        tape: &Tape,
        x: &Var,
        cfg: &GptConfig,
        attention: impl FnOnce(&Var, f32) -> Result<Var>,
    ) -> Result<Var> {
        self.forward_stream(tape, Residual::Value(x.clone()), cfg, attention)?
            .value(tape)
    }

    /// [`Block::forward_with`] on the residual stream: it takes the stream (maybe a sum still to
    /// add) and returns `x + mlp(…)` unadded, so the next layer norm adds it in its kernel.
    pub fn forward_stream(
        &self,
        tape: &Tape,
        x: Residual,
        cfg: &GptConfig,
        attention: impl FnOnce(&Var, f32) -> Result<Var>,
    ) -> Result<Residual> {
        let hs = cfg.n_embd / cfg.n_head;
        // Attention.
        let (x, h) = self.ln_1.forward_residual(tape, x)?;
        let qkv = self.c_attn.forward(tape, &h)?; // (B,T,3C)
        let scope = tensor::profile::scope("attention"); // q·kᵀ, softmax, att·v, heads
        let y = attention(&qkv, cfg.variant.attention_scale(hs, self.layer))?; // (B,T,C)
        drop(scope);
        let attn = self.attn_c_proj.forward(tape, &y)?;
        // MLP.
        let (x, h) = self.ln_2.forward_residual(tape, Residual::Sum(x, attn))?;
        let h = self.mlp(tape, &h, cfg.variant.activation)?; // via (B,T,F), `mlp.rs`
        Ok(Residual::Sum(x, h))
    }
}

impl Gpt2 {
    /// Build the model from a loaded checkpoint on `device`; every parameter trainable or
    /// every parameter frozen (LoRA freezes the base and adds trainable adapters). The weights
    /// the checkpoint holds in NF4 ([`Checkpoint::nf4`]) go to the device as their 4-bit codes
    /// (QLoRA's frozen base); such a model cannot be `trainable`.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: &Device, trainable: bool) -> Result<Gpt2> {
        let cfg = ckpt.config.clone();
        let param = |name: &str| load_param(ckpt, device, name, trainable);
        let linear = |p: &str| -> Result<Linear> {
            let name = format!("{p}.weight");
            let weight = match ckpt.nf4.get(&name) {
                None => Weight::Dense(param(&name)?),
                Some(_) if trainable => {
                    return Err(Error::Invalid(format!(
                        "`{name}` is stored in NF4 (a quantized base), which cannot be trained:                          fine-tune it with LoRA, or load the f32 model for full fine-tuning"
                    )));
                }
                Some(q) => Weight::Nf4(Nf4Linear::new(&name, q, device)?),
            };
            Ok(Linear {
                weight,
                bias: param(&format!("{p}.bias"))?,
                adapter: None,
            })
        };
        let norm = |p: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: param(&format!("{p}.weight"))?,
                bias: param(&format!("{p}.bias"))?,
                eps: cfg.layer_norm_epsilon,
            })
        };
        let mut h = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            h.push(Block {
                layer: i,
                ln_1: norm(&format!("h.{i}.ln_1"))?,
                c_attn: linear(&format!("h.{i}.attn.c_attn"))?,
                attn_c_proj: linear(&format!("h.{i}.attn.c_proj"))?,
                ln_2: norm(&format!("h.{i}.ln_2"))?,
                c_fc: linear(&format!("h.{i}.mlp.c_fc"))?,
                mlp_c_proj: linear(&format!("h.{i}.mlp.c_proj"))?,
            });
        }
        Ok(Gpt2 {
            wte: param("wte.weight")?,
            wpe: param("wpe.weight")?,
            h,
            ln_f: norm("ln_f")?,
            lm_head: match cfg.variant.tie_word_embeddings {
                true => None,
                false => Some(param(LM_HEAD)?),
            },
            token_adapter: None,
            config: cfg,
        })
    }

    /// Every parameter with its Hugging Face name, in the order of [`parameter_shapes`]
    /// (less the weights stored in NF4, see [`Checkpoint::nf4`]).
    pub fn named_params(&self) -> Vec<&Param> {
        let mut out = vec![&self.wte, &self.wpe];
        for b in &self.h {
            out.extend([&b.ln_1.weight, &b.ln_1.bias]);
            out.extend(b.c_attn.params());
            out.extend(b.attn_c_proj.params());
            out.extend([&b.ln_2.weight, &b.ln_2.bias]);
            out.extend(b.c_fc.params());
            out.extend(b.mlp_c_proj.params());
        }
        out.extend([&self.ln_f.weight, &self.ln_f.bias]);
        out.extend(self.lm_head.as_ref());
        debug_assert_eq!(
            out.len()
                + self
                    .linears()
                    .filter(|l| !matches!(l.weight, Weight::Dense(_)))
                    .count(),
            parameter_shapes(&self.config).len()
        );
        out
    }

    /// The four Linears of every block, in order.
    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.h
            .iter()
            .flat_map(|b| [&b.c_attn, &b.attn_c_proj, &b.c_fc, &b.mlp_c_proj])
    }

    /// Stores the frozen f32 weight of every block's Linears in f16 (`--precision f16`): half
    /// their bytes, each value rounded to the nearest f16, products still summed in f32
    /// ([`Weight::F16`]). Embeddings, layer norms, biases and anything trainable stay f32; a
    /// trainable Linear weight is refused by name. Returns the weights' device bytes before and
    /// after.
    pub fn store_frozen_linears_in_f16(&mut self) -> Result<(u64, u64)> {
        let (mut before, mut after) = (0, 0);
        for b in &mut self.h {
            for l in [
                &mut b.c_attn,
                &mut b.attn_c_proj,
                &mut b.c_fc,
                &mut b.mlp_c_proj,
            ] {
                before += l.weight.bytes();
                if let Some(w) = l.weight.to_f16()? {
                    l.weight = w;
                }
                after += l.weight.bytes();
            }
        }
        Ok((before, after))
    }

    /// A tape for one training step of this model. When the frozen block weights are stored in
    /// f16 (`--precision f16`, [`Gpt2::store_frozen_linears_in_f16`]) it saves the activations
    /// backward needs in f16 too ([`autograd::saved`]): half the bytes a step holds between its
    /// passes, every sum still f32.
    pub fn training_tape(&self) -> Tape {
        let tape = Tape::new();
        if self.linears().any(|l| matches!(l.weight, Weight::F16(_))) {
            tape.save_activations_in_f16();
        }
        tape
    }

    /// Copy every parameter back to the host as a checkpoint (for saving). A model with NF4
    /// or f16 weights has no f32 values to save: an error names the first.
    pub fn to_checkpoint(&self) -> Result<Checkpoint> {
        for l in self.linears() {
            l.weight.dense("saving a full checkpoint")?;
        }
        let mut tensors = Vec::new();
        for p in self.named_params() {
            let t = p.value();
            tensors.push((p.name().to_string(), t.shape().to_vec(), t.to_vec()?));
        }
        Ok(Checkpoint::new(self.config.clone(), tensors))
    }

    /// Total number of parameter values (quantized and f16 weights included).
    pub fn num_params(&self) -> usize {
        let quantized: usize = self
            .linears()
            .filter(|l| !matches!(l.weight, Weight::Dense(_)))
            .map(|l| l.weight.numel())
            .sum();
        quantized
            + self
                .named_params()
                .iter()
                .map(|p| p.value().numel())
                .sum::<usize>()
    }

    /// Mutable access to every parameter (to freeze or unfreeze them).
    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut out = vec![&mut self.wte, &mut self.wpe];
        for b in &mut self.h {
            out.extend([&mut b.ln_1.weight, &mut b.ln_1.bias]);
            out.extend(b.c_attn.params_mut());
            out.extend(b.attn_c_proj.params_mut());
            out.extend([&mut b.ln_2.weight, &mut b.ln_2.bias]);
            out.extend(b.c_fc.params_mut());
            out.extend(b.mlp_c_proj.params_mut());
        }
        out.extend([&mut self.ln_f.weight, &mut self.ln_f.bias]);
        out.extend(self.lm_head.as_mut());
        out
    }

    /// Logits (B·T, V) for ids (B·T, row-major by sequence).
    pub fn logits(&self, tape: &Tape, ids: &[u32], b: usize, t: usize) -> Result<Var> {
        self.forward(tape, ids, b, t, None)
    }

    /// Logits (B·T, V) for T more tokens of each of the B sequences in `cache`: token t sits at
    /// position `cache.len + t` and attends to the cached positions and to itself and the tokens
    /// before it. Their keys and values are appended, and `cache.len` grows by T. The cache is
    /// written in place, which no backward could follow, so `tape` must be [`Tape::inference`](autograd::Tape::inference).
    pub fn logits_cached(
        &self,
        tape: &Tape,
        ids: &[u32],
        b: usize,
        t: usize,
        cache: &mut KvCache,
    ) -> Result<Var> {
        if tape.is_recording() {
            return Err(Error::Invalid(
                "logits_cached writes the KV cache in place: use Tape::inference()".into(),
            ));
        }
        if cache.batch() != b || t == 0 || cache.len + t > cache.max {
            return Err(Error::Invalid(format!(
                "{t} tokens for {b} sequences do not fit a KV cache of {} sequences holding {} of {} positions",
                cache.batch(),
                cache.len,
                cache.max
            )));
        }
        let logits = self.forward(tape, ids, b, t, Some(&*cache))?;
        cache.len += t;
        Ok(logits)
    }

    /// Embeddings, blocks, final norm and the tied head; positions start at the cache's length.
    fn forward(
        &self,
        tape: &Tape,
        ids: &[u32],
        b: usize,
        t: usize,
        cache: Option<&KvCache>,
    ) -> Result<Var> {
        let x = self.hidden(tape, ids, b, t, cache)?;
        self.head(tape, &x)
    }

    /// The output head's (V, C) weight: `lm_head` if untied, else `wte`.
    fn head_weight(&self, tape: &Tape) -> Var {
        tape.param(self.lm_head.as_ref().unwrap_or(&self.wte))
    }

    /// The output head: logits = x·Wᵀ with W = wte (tied) or lm_head, x: (N, C) → (N, V).
    /// With a [`TokenAdapter`], its head term is added.
    pub fn head(&self, tape: &Tape, x: &Var) -> Result<Var> {
        let w = self.head_weight(tape);
        let opts = MatmulOpts {
            trans_a: false,
            trans_b: true,
        };
        let logits = tape.matmul(x, &w, None, opts)?;
        match &self.token_adapter {
            Some(a) => a.head(tape, x, logits),
            None => Ok(logits),
        }
    }

    /// The final hidden states ln_f(x), (B·T, C).
    fn hidden(
        &self,
        tape: &Tape,
        ids: &[u32],
        b: usize,
        t: usize,
        cache: Option<&KvCache>,
    ) -> Result<Var> {
        let cfg = &self.config;
        if ids.len() != b * t {
            return Err(Error::Invalid(format!(
                "{} ids for a batch of {b} sequences of {t}",
                ids.len()
            )));
        }
        let pos0 = cache.map_or(0, |c| c.len);
        if pos0 + t > cfg.n_positions {
            return Err(Error::Invalid(format!(
                "sequence of {} tokens is longer than the model's context of {}",
                pos0 + t,
                cfg.n_positions
            )));
        }
        let c = cfg.n_embd;
        let mut tok = tape.embedding(&tape.param(&self.wte), ids)?; // (B·T, C)
        if let Some(a) = &self.token_adapter {
            tok = a.embed(tape, ids, tok)?;
        }
        let positions: Vec<u32> = (0..b)
            .flat_map(|_| pos0 as u32..(pos0 + t) as u32)
            .collect();
        let pos = tape.embedding(&tape.param(&self.wpe), &positions)?;
        let (tok, pos) = (
            tape.reshape(&tok, &[b, t, c])?,
            tape.reshape(&pos, &[b, t, c])?,
        );
        // The embeddings' sum and every residual are added by the layer norm that reads them.
        let mut x = Residual::Sum(tok, pos);
        for (l, block) in self.h.iter().enumerate() {
            let layer_cache = cache.map(|c| (&c.k[l], &c.v[l], pos0));
            x = block.forward_stream(tape, x, cfg, |qkv, scale| {
                self_attention(tape, qkv, cfg.n_head, scale, layer_cache)
            })?;
        }
        let (_, x) = self.ln_f.forward_residual(tape, x)?;
        Ok(tape.reshape(&x, &[b * t, c])?)
    }

    /// Mean next-token cross-entropy of `targets` weighted by `weights` (0 = not counted).
    /// The (N, V) logits of the output layer are not kept: the loss is the tape's fused
    /// `linear_cross_entropy`, whose forward leaves only the (small) gradients behind.
    pub fn loss(
        &self,
        tape: &Tape,
        ids: &[u32],
        targets: &[u32],
        weights: &[f32],
        b: usize,
        t: usize,
    ) -> Result<Var> {
        if targets.len() != b * t || weights.len() != b * t {
            return Err(Error::Invalid(format!(
                "{} targets and {} weights for a batch of {b} sequences of {t}",
                targets.len(),
                weights.len()
            )));
        }
        let x = self.hidden(tape, ids, b, t, None)?;
        // The (N, V) logits dominate a step's time; compute them only for the rows
        // whose loss counts (a fine-tuning batch counts its completion tokens, not the prompt
        // or the padding); the gather's backward scatters the rows' gradients back.
        let rows: Vec<u32> = (0..(b * t) as u32)
            .filter(|&i| weights[i as usize] > 0.0)
            .collect();
        let (x, targets, weights) = if rows.len() < b * t && !rows.is_empty() {
            let t_sel: Vec<u32> = rows.iter().map(|&i| targets[i as usize]).collect();
            let w_sel: Vec<f32> = rows.iter().map(|&i| weights[i as usize]).collect();
            (tape.gather_rows(&x, &rows)?, t_sel, w_sel)
        } else {
            (x, targets.to_vec(), weights.to_vec())
        };
        if self.token_adapter.as_ref().is_some_and(|a| a.adapts_head()) {
            let logits = self.head(tape, &x)?;
            return Ok(tape.cross_entropy(&logits, &targets, &weights)?);
        }
        let head = self.head_weight(tape);
        Ok(tape.linear_cross_entropy(&x, &head, &targets, &weights)?)
    }
}

/// One tensor of the checkpoint as a parameter on `device`.
fn load_param(ckpt: &Checkpoint, device: &Device, name: &str, trainable: bool) -> Result<Param> {
    let (shape, values) = ckpt
        .get(name)
        .ok_or_else(|| Error::Invalid(format!("checkpoint has no tensor `{name}`")))?;
    let t = Tensor::from_vec(values.to_vec(), shape, device)?;
    Ok(if trainable {
        Param::trainable(name, t)
    } else {
        Param::frozen(name, t)
    })
}
