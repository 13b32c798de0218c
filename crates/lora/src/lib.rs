//! # lora: low-rank adapters for GPT-2
//!
//! Fine-tuning changes a pretrained weight W0 into W0 + ΔW. LoRA (Hu et al. 2021, "LoRA:
//! Low-Rank Adaptation of Large Language Models") bets that the ΔW a task needs has low rank,
//! and trains it in factored form. In the paper's layout (W: (out, in), h = W·x):
//!
//! ```text
//! h = W0·x + (α/r)·B·A·x          A: (r, in), B: (out, r), r ≪ min(in, out)
//! ```
//!
//! GPT-2's Linears are Hugging Face Conv1D, W: (in, out), applied to rows as y = x·W + b, and
//! PEFT stores A as (r, in) and B as (out, r) all the same. So in this crate's layout:
//!
//! ```text
//! y = x·W0 + b + s·(x·Aᵀ)·Bᵀ       x: (N, in), y: (N, out), s = α/r
//! ΔW = s·Aᵀ·Bᵀ  (in, out)           what merging adds to W
//! ```
//!
//! B·A (or Aᵀ·Bᵀ) is never formed while training: the adapter's path is two thin products,
//! x·Aᵀ (N, r) then ·Bᵀ (N, out), costing 2·N·r·(in + out) multiply-adds next to the base
//! layer's N·in·out.
//!
//! **The scale s = α/r.** With A's init fixed, the size of the update grows with r; dividing by
//! r lets one learning rate (and one α) serve every rank. rsLoRA (Kalajdzievski 2023) divides by
//! √r instead, which keeps the update's scale stable as r grows (`use_rslora`).
//!
//! **Why B = 0 at the start.** Then ΔW = 0 and the adapted model computes exactly what the
//! pretrained one does: training starts from the model we chose, not from a perturbed one.
//! A is random so that learning can start: dB = s·dyᵀ·(x·Aᵀ) is non-zero from the first step,
//! while dA = s·(dy·B)ᵀ·x is zero until B has moved. Were both zero, both gradients would be
//! zero forever. (loralib's comment says the reverse of what its code does; the code is right,
//! and a test here checks the invariant bitwise rather than trusting a comment.)
//!
//! **Why a frozen W0 saves memory and time.** A frozen W0 ([`autograd::Param::Frozen`]) has no
//! gradient buffer, no AdamW m and v, and its matmul's backward computes dx only, not dW0, so
//! the input x is not even kept for it. For GPT-2 small (124M parameters), full fine-tuning
//! with AdamW keeps 3 × 124M f32 (gradient, m, v: about 1.5 GB) on top of the weights; LoRA
//! with r = 8 on q and v keeps 3 × 294,912 (about 3.5 MB), and skips one of the two backward
//! products of every frozen Linear.
//!
//! **Merge and unmerge.** For inference, W ← W0 + ΔW folds the adapter into the weight: the
//! forward then costs exactly the base model's (the adapter sees the merged flag and adds
//! nothing). W ← W − ΔW unmerges, up to f32 rounding (the tests measure the drift). Switching
//! task is unmerge one adapter, merge another: one small product per adapted Linear.
//!
//! **q, k, v.** GPT-2 fuses them into `c_attn` (C, 3C); the paper adapts q and v. A q adapter
//! here is an update of columns [0, C) only (v: [2C, 3C)): its (N, C) output is added into
//! those columns of c_attn's (N, 3C) output, and merging writes those columns of W only.
//!
//! **PEFT.** Adapters are saved and loaded in PEFT's layout (`adapter_config.json` +
//! `adapter_model.safetensors`), so they move both ways between this crate and PyTorch.
//! PEFT cannot name a column slice, so q/k/v adapters are saved as the equivalent whole-`c_attn`
//! adapter (A stacked, B block-diagonal; `peft_save.rs` shows the layout): the same function
//! under PEFT's one-scale-per-module rule, and it loads back here as a `c_attn` adapter.
//!
//! ## Reading order
//! 1. [`target`] and [`config`]: where updates go; rank and α (by target, or by module name as
//!    PEFT's patterns give them: `name_patterns.rs`), the plan of sites, counts; [`base_init`]:
//!    PiSSA and OLoRA, which start A and B from W0 and save the trained change as a plain LoRA;
//! 2. [`linear`]: the adapter on one Linear, forward and backward;
//! 3. [`model`]: attach (freeze the base), merge and unmerge, what the optimizer trains;
//! 4. `peft_save.rs`, `peft_config.rs`, `peft_pattern.rs` (how PEFT matches module names),
//!    `peft_load.rs`: PEFT's files both ways, and what else PEFT saves in an adapter (DoRA in
//!    [`dora`], `lora_bias`, AdaLoRA, trained biases, `modules_to_save`, trainable tokens, and
//!    in `token_lora.rs` LoRA on `wte` or the tied `lm_head` and a copy of `wte`);
//! 5. [`bank`]: many adapters over one unmerged base, a different one per sequence of a batch
//!    (serving, forward only);
//! 6. [`combine`](mod@combine): several adapters made into one, as PEFT's `add_weighted_adapter` does
//!    (`linear`, `cat`, `svd`, `ties`);
//! 7. [`analysis`]: the paper's section 7: the spectrum of ΔW, the subspace similarity of two
//!    adapters, and its heat map;
//! 8. [`adalora`]: AdaLoRA trained here (SVD-form updates P·diag(Λ)·Q, the orthogonal
//!    regularizer, PEFT's rank allocator in `adalora/allocator.rs`, saving in PEFT's ADALORA
//!    layout), replayed against PEFT's own run in `tests/adalora_parity.rs`.
//!
//! ```
//! use lora::{LoraConfig, LoraModel, Target};
//! use transformer::{Checkpoint, Gpt2};
//! use tensor::Device;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/gpt2-tiny");
//! let ckpt = Checkpoint::load(dir)?;
//! let mut model = Gpt2::from_checkpoint(&ckpt, &Device::cpu(), false)?;
//! let config = LoraConfig::new(4, 8.0, &[Target::Q, Target::V]);
//! let lora = LoraModel::inject(&mut model, &config, 0)?;
//! // 2 layers × 2 targets × (4·64 + 64·4)
//! assert_eq!(lora.param_count(&model).trainable, 2048);
//! assert_eq!(lora.trainable_params().len(), 8); // A and B of 4 sites: all the optimizer sees
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod adalora;
pub mod analysis;
pub mod bank;
pub mod base_init;
pub mod combine;
pub mod config;
pub mod dora;
mod error;
pub mod linear;
pub mod model;
mod name_patterns;
mod peft_config;
mod peft_load;
mod peft_pattern;
mod peft_save;
pub mod target;
mod token_lora;

pub use adalora::{
    AdaLora, AdaLoraConfig, AdaLoraRanks, AdaLoraSchedule, RankAllocator, SvdUpdate,
};
pub use analysis::{Similarities, SiteSimilarity, SiteSpectrum, Spectra, write_heatmap_svg};
pub use bank::{AdapterBank, HostAdapter, Routing};
pub use combine::{Combination, CombineInput, Combined, combine};
pub use config::{BiasMode, Init, LoraConfig, ParamCount, Site, scaling};
pub use error::{Error, Result};
pub use linear::{LoraAdapter, LoraUpdate};
pub use model::{LoraModel, site_name};
pub use peft_config::MAX_CONFIG_BYTES as MAX_ADAPTER_CONFIG_BYTES;
pub use peft_load::{BIN_WEIGHTS_FILE, LoadedAdapter};
pub use peft_save::{CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, peft_target_name};
pub use target::{Module, Target};
