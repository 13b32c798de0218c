//! GPT-2, laid out exactly as Hugging Face lays it out, so real checkpoints load without
//! conversion and what we train loads back into `transformers`.
//!
//! The crate has two sides. The host side (the config, the size table of every parameter,
//! reading and writing a model directory, the tokenizers) is plain Rust on the CPU. The model
//! side ([`Gpt2`], [`generate`](mod@generate), [`beam`]) runs its forward and backward on the
//! [`tensor::Device`] its parameters live on (a GPU or the CPU backend), through
//! [`autograd::Tape`].
//!
//! # Shapes
//!
//! One set of letters, used in every doc comment and local name of the workspace:
//!
//! | letter | meaning | GPT-2 small |
//! |---|---|---|
//! | B | batch: sequences processed together | |
//! | T | time: tokens per sequence, at most `n_positions` | ≤ 1024 |
//! | C | channels: width of the residual stream, `n_embd` | 768 |
//! | NH | attention heads, `n_head` | 12 |
//! | hs | head size, C / NH | 64 |
//! | V | vocabulary size, `vocab_size` | 50257 |
//! | L | layers (transformer blocks), `n_layer` | 12 |
//!
//! # The Hugging Face GPT-2 layout
//!
//! `GPT2LMHeadModel` saves these tensors, each name prefixed with `transformer.`
//! ([`parameter_shapes`] is the table in code; `[in, out]` weights are `transformers`' Conv1D,
//! applied as `y = x·W + b`, the transpose of `nn.Linear`):
//!
//! ```text
//! wte.weight                 (V, C)            token embedding; also the output head (tied)
//! wpe.weight                 (n_positions, C)  position embedding
//! h.{i}.ln_1.weight, .bias   (C)               layer norm before attention, i in 0..L
//! h.{i}.attn.c_attn.weight   (C, 3C)           q, k, v fused: columns [0,C) q, [C,2C) k, [2C,3C) v;
//! h.{i}.attn.c_attn.bias     (3C)                head h is columns [h·hs, (h+1)·hs) of each
//! h.{i}.attn.c_proj.weight   (C, C)            heads back into the residual stream
//! h.{i}.attn.c_proj.bias     (C)
//! h.{i}.ln_2.weight, .bias   (C)               layer norm before the MLP
//! h.{i}.mlp.c_fc.weight      (C, 4C)           MLP expand, then GELU (tanh form)
//! h.{i}.mlp.c_fc.bias        (4C)
//! h.{i}.mlp.c_proj.weight    (4C, C)           MLP contract
//! h.{i}.mlp.c_proj.bias      (C)
//! ln_f.weight, .bias         (C)               final layer norm; logits = ln_f(x)·wteᵀ  (B,T,V)
//! ```
//!
//! A model directory holds `config.json` ([`GptConfig`], with its [`Variant`]), the weights
//! ([`Checkpoint`]: `model.safetensors`, shards with an index, or `pytorch_model.bin` through the
//! code-free [`torch_pickle`] reader), and optionally its tokenizer, `tokenizer.json` or
//! `vocab.json` + `merges.txt` ([`Tokenizer::for_model`]).
//!
//! # Reading order
//!
//! [`config`] → [`checkpoint`] (the size table and the model directory) → [`tensor_file`] (one
//! safetensors file, atomic writes) → [`tokenizer`] → `bpe.rs` (byte-level BPE by hand) →
//! [`model`] → [`generate`](mod@generate) (sampling with a KV cache) → [`beam`] (beam search).
//!
//! ```
//! use transformer::{Checkpoint, Tokenizer};
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/gpt2-tiny");
//! let ckpt = Checkpoint::load(dir)?;
//! let (shape, _values) = ckpt.get("h.0.attn.c_attn.weight").unwrap();
//! assert_eq!(shape, [64, 3 * 64]); // (C, 3C)
//!
//! let tok = Tokenizer::for_model(dir, &ckpt.config)?; // this tiny model reads bytes
//! assert_eq!(tok.decode(&tok.encode("Hi!")), "Hi!");
//! assert_eq!(Tokenizer::gpt2().encode("Hello world"), [15496, 995]);
//! # Ok::<(), transformer::Error>(())
//! ```

pub mod attention;
pub mod beam;
mod bpe;
pub mod bpe_train;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
mod hf_tokenizer;
pub mod init;
pub mod linear;
mod mlp;
pub mod model;
pub mod nf4_file;
pub mod tensor_file;
pub mod token_adapter;
pub mod tokenizer;
pub mod torch_pickle;
pub mod variant;
mod weight_files;

pub use beam::{BeamConfig, beam_search};
pub use bpe::bytes_to_unicode;
pub use bpe_train::train_bpe;
pub use checkpoint::{Checkpoint, num_parameters, parameter_shapes};
pub use config::{GptConfig, TokenizerKind};
pub use error::{Error, Result};
pub use generate::{GenerateConfig, Generation, StopReason, generate, generate_tokens};
pub use init::init_checkpoint;
pub use linear::{Adapter, F16Linear, Linear, Nf4Linear, Weight};
pub use model::{Gpt2, KvCache, Residual};
pub use tensor_file::{NamedTensor, SaveDtype};
pub use token_adapter::TokenAdapter;
pub use tokenizer::Tokenizer;
pub use variant::{Activation, Variant};
