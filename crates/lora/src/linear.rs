//! The adapter layer: [`LoraUpdate`] is one low-rank update of one Linear's output columns, and
//! [`LoraAdapter`] is what hangs on a [`transformer::model::Linear`] (one or more of them: q and
//! v of the same `c_attn` are two).
//!
//! Shapes (N = B·T rows, in/width as in [`crate::Site`]), with the base output y = x·W0 + b:
//! ```text
//! x  (N, in)  ──dropout──▶ x̃ ──·Aᵀ──▶ h (N, r) ──·s──▶ s·h ──·Bᵀ──▶ Δy (N, width)
//! out = y + Δy               when the update covers all of W's columns
//! out = y with Δy added into columns col0..col0+width   (q, k or v of c_attn)
//! ```
//! Without DoRA or `lora_bias`, [`Tape::lora_into`] runs this in two products and no copy: h is
//! scaled in the first product's epilogue, and Δy is accumulated straight into y's columns (the
//! q or v block of c_attn's output) by the second; its backward reads dy's block in place.
//! Several such updates of one Linear (q and v) run together, [`Tape::lora_group`]: each
//! product is one grouped call for all of them ([`LoraAdapter`]).
//! DoRA and `lora_bias` take the op-by-op path ([`LoraUpdate::delta`] and an add).
//!
//! Backward (the tape's matmul rule; g = s·h is the scaled (N, r) intermediate):
//! ```text
//! dB = dΔyᵀ·g  (width, r)      dg = dΔy·B  (N, r)      dh = s·dg
//! dA = dhᵀ·x̃   (r, in)         dx̃ = dh·A   (N, in)
//! dx = dy·W0ᵀ (the base path) + dropout's backward of dx̃
//! ```
//! No gradient, and no saved activation, exists for W0. The scale multiplies h (N·r numbers)
//! rather than Δy (N·width): the same product, fewer multiplications.
//!
//! Merged ([`crate::LoraModel::merge`]): W ← W0 + s·Aᵀ·Bᵀ holds the update, and `apply` adds
//! nothing, so inference costs exactly the base model.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use autograd::{Param, Tape, Var};
use rand::Rng;
use rand::rngs::StdRng;
use rand_distr::Normal;
use tensor::ops::elementwise::scale;
use tensor::ops::matmul::{MatmulOpts, matmul};
use tensor::{Device, Tensor};
use transformer::model::Adapter;

use crate::config::{Init, Site};
use crate::dora::Dora;

/// `x·Mᵀ` for a weight M stored (rows, cols) as PEFT stores A and B.
const TRANS_B: MatmulOpts = MatmulOpts {
    trans_a: false,
    trans_b: true,
};

/// Seeds for the adapters' dropout: every call draws a fresh one, so each forward pass (and
/// each adapter within it) gets its own mask, reproducibly from the base seed.
#[derive(Debug)]
pub struct DropoutSeeds {
    base: AtomicU64,
    calls: AtomicU64,
}

/// SplitMix64's finaliser: a bijection of u64 that scatters nearby inputs.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl DropoutSeeds {
    pub fn new(base: u64) -> DropoutSeeds {
        DropoutSeeds {
            base: AtomicU64::new(base),
            calls: AtomicU64::new(0),
        }
    }

    /// Start over from `base` (to replay a run).
    pub fn reset(&self, base: u64) {
        self.base.store(base, Ordering::Relaxed);
        self.calls.store(0, Ordering::Relaxed);
    }

    /// The seed of the next dropout call.
    pub fn next(&self) -> u64 {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        mix(self.base.load(Ordering::Relaxed) ^ mix(n))
    }
}

/// One low-rank update ΔW = s·Aᵀ·Bᵀ (in the Conv1D layout of W: (in, out)) of the columns
/// `col0..col0 + width` of a Linear's output. A and B are trainable; W0 is not touched.
///
/// Clones share A, B (the same tensors and ids), the merged flag and the dropout seeds: the
/// copy on the model's Linear and the copy in [`crate::LoraModel`] are one adapter.
#[derive(Clone, Debug)]
pub struct LoraUpdate {
    /// A: (r, in), PEFT's `lora_A.weight`.
    pub a: Param,
    /// B: (width, r), PEFT's `lora_B.weight`.
    pub b: Param,
    /// α, kept for saving; the forward uses `scale`.
    pub alpha: f32,
    /// s = α/r (or α/√r).
    pub scale: f32,
    /// First output column the update adds into.
    pub col0: usize,
    /// Dropout probability on the adapter's input.
    pub dropout: f32,
    /// b_B: (width), PEFT's `lora_B.bias` (`lora_bias`): Δy = s·((x·Aᵀ)·Bᵀ + b_B).
    pub lora_bias: Option<Param>,
    /// DoRA's magnitude (`use_dora`): see [`crate::dora`].
    pub dora: Option<Arc<Dora>>,
    pub(crate) merged: Arc<AtomicBool>,
    pub(crate) seeds: Arc<DropoutSeeds>,
}

impl LoraUpdate {
    /// A: (r, in) and B: (width, r) initialised as `init` says for `site`, on `device`.
    pub(crate) fn init(
        site: &Site,
        init: Init,
        rng: &mut StdRng,
        device: &Device,
    ) -> tensor::Result<(Tensor, Tensor)> {
        let (r, n_in, width) = (site.r, site.in_features, site.width);
        let uniform = |rng: &mut StdRng, n: usize, bound: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        if init.changes_base() {
            return Err(tensor::Error::Invalid(format!(
                "the {} init starts from the base weight: LoraModel::new computes it",
                init.name()
            )));
        }
        let a = match init {
            Init::KaimingUniform | Init::BothRandom | Init::Pissa | Init::Olora => {
                uniform(rng, r * n_in, 1.0 / (n_in as f32).sqrt())
            }
            Init::Gaussian => {
                let normal = Normal::new(0.0f32, 1.0 / r as f32).expect("1/r is a valid std");
                (0..r * n_in).map(|_| rng.sample(normal)).collect()
            }
        };
        let b = match init {
            Init::BothRandom => uniform(rng, width * r, 1.0 / (r as f32).sqrt()),
            _ => vec![0.0; width * r],
        };
        Ok((
            Tensor::from_vec(a, &[r, n_in], device)?,
            Tensor::from_vec(b, &[width, r], device)?,
        ))
    }

    /// r: the rank.
    pub fn r(&self) -> usize {
        self.a.value().shape()[0]
    }

    /// in: the Linear's input width.
    pub fn in_features(&self) -> usize {
        self.a.value().shape()[1]
    }

    /// width: output columns the update covers.
    pub fn width(&self) -> usize {
        self.b.value().shape()[0]
    }

    /// Whether W currently holds this update (then the forward adds nothing).
    pub fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Relaxed)
    }

    /// dropout(x), or x itself when the adapter has no dropout.
    fn dropped(&self, tape: &Tape, x: &Var) -> tensor::Result<Var> {
        if self.dropout > 0.0 {
            tape.dropout(x, self.dropout, self.seeds.next())
        } else {
            Ok(x.clone())
        }
    }

    /// Δy = s·(dropout(x)·Aᵀ)·Bᵀ (+ s·b_B with `lora_bias`): (…, in) → (…, width).
    pub fn delta(&self, tape: &Tape, x: &Var) -> tensor::Result<Var> {
        let x = self.dropped(tape, x)?;
        let h = tape.matmul(&x, &tape.param(&self.a), None, TRANS_B)?; // (…, r)
        let h = tape.scale(&h, self.scale)?;
        let bias = match &self.lora_bias {
            Some(b) => Some(tape.scale(&tape.param(b), self.scale)?),
            None => None,
        };
        tape.matmul(&h, &tape.param(&self.b), bias.as_ref(), TRANS_B) // (…, width)
    }

    /// ΔW = s·Aᵀ·Bᵀ: (in, width), the update in W's layout (what merging adds to W).
    pub fn delta_weight(&self) -> tensor::Result<Tensor> {
        let opts = MatmulOpts {
            trans_a: true,
            trans_b: true,
        };
        scale(
            &matmul(self.a.value(), self.b.value(), None, opts)?,
            self.scale,
        )
    }
}

impl Adapter for LoraUpdate {
    fn apply(&self, tape: &Tape, x: &Var, y: Var) -> transformer::Result<Var> {
        if self.is_merged() {
            return Ok(y);
        }
        if self.dora.is_none() && self.lora_bias.is_none() {
            // The fused path: two products, the second accumulating into y's columns.
            let x = self.dropped(tape, x)?;
            let (a, b) = (tape.param(&self.a), tape.param(&self.b));
            return Ok(tape.lora_into(y, &x, &a, &b, self.scale, self.col0)?);
        }
        let delta = self.delta(tape, x)?;
        if let Some(dora) = &self.dora {
            return Ok(dora.apply(tape, &y, &delta, self)?);
        }
        let out = if delta.shape() == y.shape() {
            tape.add(&y, &delta)?
        } else {
            let last = y.shape().len() - 1;
            tape.add_into_axis(&y, last, self.col0, &delta)?
        };
        Ok(out)
    }

    fn params(&self) -> Vec<&Param> {
        let mut p = vec![&self.a, &self.b];
        p.extend(self.dora.as_ref().map(|d| &d.magnitude));
        p
    }
}

/// The adapters on one Linear, each adding into its own columns (q's and v's of c_attn).
///
/// When every part takes the fused path with the same input and scale (no DoRA, no
/// `lora_bias`, not merged, no dropout: dropout gives each part its own x̃) and the same r,
/// the parts run together, [`Tape::lora_group`]: each of their products is one grouped call
/// (one dispatch on a GPU when A's and B's are at one step in one buffer, as in AdamW's
/// parameter arena), 12 products of q and v in 7 dispatches instead of 12. Otherwise the parts
/// are applied one after the other.
#[derive(Clone, Debug, Default)]
pub struct LoraAdapter {
    pub parts: Vec<LoraUpdate>,
}

impl LoraAdapter {
    /// Whether the parts can run as one [`Tape::lora_group`].
    fn groups(&self) -> bool {
        let fused = |p: &LoraUpdate| {
            !p.is_merged() && p.dora.is_none() && p.lora_bias.is_none() && p.dropout <= 0.0
        };
        match self.parts.first() {
            Some(first) => {
                self.parts.len() > 1
                    && self
                        .parts
                        .iter()
                        .all(|p| fused(p) && p.scale == first.scale && p.r() == first.r())
            }
            None => false,
        }
    }
}

impl Adapter for LoraAdapter {
    fn apply(&self, tape: &Tape, x: &Var, mut y: Var) -> transformer::Result<Var> {
        if self.groups() {
            let vars: Vec<(Var, Var)> = self
                .parts
                .iter()
                .map(|p| (tape.param(&p.a), tape.param(&p.b)))
                .collect();
            let parts: Vec<(&Var, &Var, usize)> = vars
                .iter()
                .zip(&self.parts)
                .map(|((a, b), p)| (a, b, p.col0))
                .collect();
            return Ok(tape.lora_group(y, x, &parts, self.parts[0].scale)?);
        }
        for part in &self.parts {
            y = part.apply(tape, x, y)?;
        }
        Ok(y)
    }

    fn params(&self) -> Vec<&Param> {
        self.parts.iter().flat_map(|p| p.params()).collect()
    }
}
