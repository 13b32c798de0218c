//! PEFT's adapters on the two uses of the tied token embedding `wte` (V, C), as a
//! [`TokenAdapter`] on the model:
//!
//! - LoRA on `wte` (`lora_embedding_A` (r, V), `lora_embedding_B` (C, r)): the input rows get
//!   x = wte[ids] + s·A[:, ids]ᵀ·Bᵀ; the tied head keeps the original `wte`.
//! - LoRA on `lm_head` (`lora_A` (r, C), `lora_B` (V, r)): logits = x·wteᵀ + s·(x·Aᵀ)·Bᵀ; the
//!   input rows keep the original `wte`.
//! - a `modules_to_save` copy of `wte`: the input rows come from the copy; the head keeps `wte`.
//!
//! Both LoRAs are held as ΔW = s·P·Qᵀ (V, C) with P (V, r), Q (C, r): P = Aᵀ, Q = B for the
//! embedding, P = B, Q = Aᵀ for the head. PEFT's merge adds ΔW to the shared matrix, so after
//! merging both uses see it (this is why PEFT's merged loss differs from its unmerged one). The
//! copy of `wte` is PEFT's module swap: merge_and_unload puts the copy in the input embedding and
//! leaves the head on the original matrix, so a merged and detached model is untied.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use autograd::{Param, Tape, Var};
use tensor::ops::elementwise::scale;
use tensor::ops::matmul::{MatmulOpts, matmul};
use tensor::ops::slice::write_axis;
use tensor::{Device, Tensor};
use transformer::{Gpt2, TokenAdapter};

use crate::config::scaling;
use crate::error::Result;
use crate::peft_config::{Kind, PeftConfig};
use crate::peft_load::peft_targets;

const TRANS_B: MatmulOpts = MatmulOpts {
    trans_a: false,
    trans_b: true,
};

/// ΔW = s·P·Qᵀ: P (V, r), Q (C, r).
#[derive(Clone)]
pub(crate) struct LowRank {
    pub p: Param,
    pub q: Param,
    pub scale: f32,
}

impl LowRank {
    /// From host values: P (V, r) and Q (C, r) row-major.
    pub fn new(
        p: (Vec<f32>, [usize; 2]),
        q: (Vec<f32>, [usize; 2]),
        s: f32,
        device: &Device,
    ) -> Result<LowRank> {
        Ok(LowRank {
            p: Param::frozen("P", Tensor::from_vec(p.0, &p.1, device)?),
            q: Param::frozen("Q", Tensor::from_vec(q.0, &q.1, device)?),
            scale: s,
        })
    }

    /// ΔW = s·P·Qᵀ, (V, C).
    fn delta(&self) -> Result<Tensor> {
        let pq = matmul(self.p.value(), self.q.value(), None, TRANS_B)?;
        Ok(scale(&pq, self.scale)?)
    }
}

/// The adapters on `wte`'s two uses of one loaded PEFT adapter.
#[derive(Clone)]
pub(crate) struct TokenLora {
    /// LoRA on the input embedding.
    pub embed: Option<LowRank>,
    /// LoRA on the output head.
    pub head: Option<LowRank>,
    /// The `modules_to_save` copy of `wte` (V, C), used for the input rows.
    pub input: Option<Param>,
    /// Shared with the [`crate::LoraModel`]: merged LoRAs add nothing in the forward.
    pub merged: Arc<AtomicBool>,
}

impl TokenLora {
    fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Relaxed)
    }

    /// wte ← wte ± ΔW of both LoRAs (the shared matrix, as PEFT's merge).
    pub fn add_to_wte(&self, wte: &Param, sign: f32) -> Result<()> {
        for lr in self.embed.iter().chain(&self.head) {
            let d = scale(&lr.delta()?, sign)?;
            write_axis(wte.value(), 1, 0, &d, true)?;
        }
        Ok(())
    }

    /// What a merged model keeps once the adapter is taken off (PEFT's merge_and_unload): with a
    /// copy of `wte`, the copy becomes the input embedding and the head keeps the original
    /// matrix as an untied `lm_head`.
    pub fn unload(&self, model: &mut Gpt2) -> Result<()> {
        let Some(copy) = &self.input else {
            return Ok(());
        };
        if model.lm_head.is_none() {
            let head = model.wte.value().clone();
            model.lm_head = Some(Param::frozen(transformer::checkpoint::LM_HEAD, head));
            model.config.variant.tie_word_embeddings = false;
        }
        let values = copy.value().to_vec()?;
        let shape = copy.value().shape().to_vec();
        let device = model.wte.value().device();
        model.wte = Param::frozen("wte.weight", Tensor::from_vec(values, &shape, &device)?);
        Ok(())
    }
}

impl TokenAdapter for TokenLora {
    fn embed(&self, tape: &Tape, ids: &[u32], tok: Var) -> transformer::Result<Var> {
        let tok = match &self.input {
            Some(copy) => tape.embedding(&tape.param(copy), ids)?,
            None => tok,
        };
        match &self.embed {
            Some(lr) if !self.is_merged() => {
                let rows = tape.embedding(&tape.param(&lr.p), ids)?; // (N, r)
                let d = tape.matmul(&rows, &tape.param(&lr.q), None, TRANS_B)?; // (N, C)
                Ok(tape.add(&tok, &tape.scale(&d, lr.scale)?)?)
            }
            _ => Ok(tok),
        }
    }

    fn head(&self, tape: &Tape, x: &Var, logits: Var) -> transformer::Result<Var> {
        match &self.head {
            Some(lr) if !self.is_merged() => {
                let xq = tape.matmul(x, &tape.param(&lr.q), None, MatmulOpts::default())?; // (N, r)
                let d = tape.matmul(&xq, &tape.param(&lr.p), None, TRANS_B)?; // (N, V)
                Ok(tape.add(&logits, &tape.scale(&d, lr.scale)?)?)
            }
            _ => Ok(logits),
        }
    }

    fn adapts_head(&self) -> bool {
        self.head.is_some() && !self.is_merged()
    }

    fn params(&self) -> Vec<&Param> {
        let lr = self.embed.iter().chain(&self.head);
        lr.flat_map(|l| [&l.p, &l.q]).chain(&self.input).collect()
    }
}

/// The tensors of a PEFT file on `wte` and `lm_head`, as read: (shape, values).
#[derive(Default)]
pub(crate) struct TokenFile {
    embed_a: Read,
    embed_b: Read,
    head_a: Read,
    head_b: Read,
    input: Read,
}

/// A (shape, values) pair as read.
type Read = Option<(Vec<usize>, Vec<f32>)>;

/// Row-major (rows, cols) → its transpose.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols)
        .flat_map(|j| (0..rows).map(move |i| v[i * cols + j]))
        .collect()
}

impl TokenFile {
    pub fn has_embed(&self) -> bool {
        self.embed_a.is_some() || self.embed_b.is_some()
    }

    pub fn has_head(&self) -> bool {
        self.head_a.is_some() || self.head_b.is_some()
    }

    /// Takes `rest`, a key on `wte` or `lm_head` less PEFT's and the model's prefixes, or
    /// names what is not read. `wte_saved`: `modules_to_save` names `wte`.
    pub fn take(
        &mut self,
        rest: &str,
        shape: &[usize],
        data: Vec<f32>,
        wte_saved: bool,
    ) -> std::result::Result<(), String> {
        let slot = match rest {
            "wte.lora_embedding_A" => &mut self.embed_a,
            "wte.lora_embedding_B" => &mut self.embed_b,
            "lm_head.lora_A.weight" => &mut self.head_a,
            "lm_head.lora_B.weight" => &mut self.head_b,
            "wte.weight" if wte_saved => &mut self.input,
            "wte.weight" => {
                return Err("a copy of `wte`, but modules_to_save does not name `wte`".into());
            }
            r => {
                return Err(format!(
                    "`{r}` is no tensor PEFT's LoRA writes for `wte` or `lm_head` \
                     (read: wte.lora_embedding_A/B, lm_head.lora_A/B.weight, \
                     lm_head.base_layer.weight, a modules_to_save copy wte.weight)"
                ));
            }
        };
        if slot.replace((shape.to_vec(), data)).is_some() {
            return Err(format!("`{rest}` is given twice"));
        }
        Ok(())
    }

    /// The adapter, its shapes checked against the model's (V, C); `scale(module, r)` is the
    /// config's scale for `wte` or `lm_head` at rank r.
    pub fn build(
        self,
        model: &Gpt2,
        scale: impl Fn(&str, usize) -> std::result::Result<f32, String>,
    ) -> std::result::Result<Option<TokenLora>, String> {
        let (v, c) = (model.config.vocab_size, model.config.n_embd);
        let device = model.wte.value().device();
        let up = |e: crate::Error| e.to_string();
        let embed = match (self.embed_a, self.embed_b) {
            (None, None) => None,
            (Some((sa, a)), Some((sb, b))) => {
                let r = sa.first().copied().unwrap_or(0);
                if r == 0 || sa != [r, v] || sb != [c, r] {
                    return Err(format!(
                        "wte.lora_embedding_A is {sa:?} and lora_embedding_B {sb:?}; the \
                         embedding is [{v}, {c}], so they must be [r, {v}] and [{c}, r]"
                    ));
                }
                let s = scale("wte", r)?;
                Some(
                    LowRank::new((transpose(&a, r, v), [v, r]), (b, [c, r]), s, &device)
                        .map_err(up)?,
                )
            }
            _ => {
                return Err(
                    "wte: lora_embedding_A and lora_embedding_B must both be present".into(),
                );
            }
        };
        let head = match (self.head_a, self.head_b) {
            (None, None) => None,
            (Some((sa, a)), Some((sb, b))) => {
                let r = sa.first().copied().unwrap_or(0);
                if r == 0 || sa != [r, c] || sb != [v, r] {
                    return Err(format!(
                        "lm_head.lora_A is {sa:?} and lora_B {sb:?}; the head is [{v}, {c}], \
                         so they must be [r, {c}] and [{v}, r]"
                    ));
                }
                let s = scale("lm_head", r)?;
                Some(
                    LowRank::new((b, [v, r]), (transpose(&a, r, c), [c, r]), s, &device)
                        .map_err(up)?,
                )
            }
            _ => return Err("lm_head: lora_A and lora_B must both be present".into()),
        };
        if (head.is_some() || self.input.is_some()) && model.lm_head.is_some() {
            return Err(
                "an adapter on `lm_head` or a copy of `wte`, but this model's head is untied: \
                 such adapters are read for a head tied to `wte` only"
                    .into(),
            );
        }
        let input = match self.input {
            None => None,
            Some((shape, values)) if shape == [v, c] => {
                let t = Tensor::from_vec(values, &shape, &device).map_err(|e| e.to_string())?;
                Some(Param::frozen("wte.weight", t))
            }
            Some((shape, _)) => {
                return Err(format!(
                    "the copy of wte.weight is {shape:?}, the model's is [{v}, {c}]"
                ));
            }
        };
        if embed.is_none() && head.is_none() && input.is_none() {
            return Ok(None);
        }
        Ok(Some(TokenLora {
            embed,
            head,
            input,
            merged: Arc::new(AtomicBool::new(false)),
        }))
    }
}

/// The file's adapters on `wte` and `lm_head` (see [`crate::token_lora`]), checked against the
/// config: `target_modules` names `wte` / `lm_head` exactly when the file holds its LoRA, and
/// ranks and α follow `r`, `rank_pattern`, `alpha_pattern` as for the blocks' modules.
pub(crate) fn token_lora(
    pc: &PeftConfig,
    file: TokenFile,
    prefix: &str,
    model: &Gpt2,
) -> std::result::Result<Option<TokenLora>, String> {
    let (wte, head) = (format!("{prefix}wte"), "lm_head".to_string());
    for (name, held) in [(&wte, file.has_embed()), (&head, file.has_head())] {
        let named = peft_targets(pc, name)?.unwrap_or(held);
        if named != held {
            let targets = pc
                .targets
                .as_ref()
                .map_or_else(|| "(none)".into(), |t| t.to_string());
            return Err(match held {
                true => format!(
                    "the file has LoRA weights for `{name}`, which target_modules {targets} does not name"
                ),
                false => format!(
                    "target_modules {targets} names `{name}` but the file has no LoRA weights for it"
                ),
            });
        }
    }
    file.build(model, |m, r| {
        if !matches!(pc.kind, Kind::Lora) {
            return Err(format!(
                "`{m}`: an adapter on the embedding or head is read for peft_type LORA only"
            ));
        }
        let name = if m == "wte" { &wte } else { &head };
        let want_r = pc.rank_pattern.number(name)?.map_or(pc.r, |v| v as usize);
        if r != want_r {
            return Err(format!(
                "{m}: rank {r} in the file, but adapter_config.json says r = {want_r}"
            ));
        }
        let alpha = pc
            .alpha_pattern
            .number(name)?
            .map_or(pc.alpha, |v| v as f32);
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(format!(
                "{m}: lora_alpha is {alpha}; it must be positive and finite"
            ));
        }
        Ok(scaling(alpha, r, pc.use_rslora))
    })
}
