//! Reading adapters off the engine's thread: `POST /v1/adapters` reads and checks the PEFT files
//! on a blocking task of the HTTP runtime while the engine keeps decoding, and hands the engine
//! only the weights, ready to be written into the bank's slot (a copy of a few KiB).
//!
//! The checks are [`LoraModel::load_peft`]'s (those of `train eval --adapter`) and the bank's
//! ([`HostAdapter::new`]). `load_peft` checks an adapter against a model's shape (its config:
//! layers, widths, vocabulary) and puts the tensors on that model's device; it reads no weight
//! of the base. The engine's model never leaves the engine's thread, so the reader checks
//! against a stand-in: a [`Gpt2`] with the base's config whose parameters hold no numbers, on
//! the CPU (the weights are copied to the host for the bank anyway). The tests compare its
//! answers with those of the real model, for adapters that fit and for ones that do not.

use std::path::Path;

use autograd::Param;
use lora::{HostAdapter, LoraModel};
use tensor::{Device, Tensor};
use transformer::model::{Block, LayerNorm, Linear};
use transformer::{Gpt2, GptConfig};

use super::adapters::Mode;

/// An adapter read and checked, for the engine to insert.
pub struct Ready {
    /// The weights for the bank; `None` in [`Mode::MergeSwitch`], where the engine reads the
    /// adapter onto its device itself (it merges it into the base weights there).
    pub host: Option<HostAdapter>,
    pub warnings: Vec<String>,
    /// Bytes of its A and B.
    pub bytes: u64,
}

/// Reads adapters for a base of `config`; cheap to make, usable on any thread.
#[derive(Clone)]
pub struct Reader {
    pub config: GptConfig,
    pub mode: Mode,
}

impl Reader {
    /// Reads the PEFT adapter in `dir` as `name` and checks it (see the module doc).
    pub fn read(&self, name: &str, dir: &Path) -> lora::Result<Ready> {
        let model = stand_in(&self.config)?;
        read_with(&model, self.mode, name, dir)
    }
}

/// Reads the PEFT adapter in `dir` as `name` against `model` (the real one or a stand-in).
pub fn read_with(model: &Gpt2, mode: Mode, name: &str, dir: &Path) -> lora::Result<Ready> {
    let loaded = LoraModel::load_peft(dir, model)?;
    let bytes = loaded.lora.lora_bytes();
    let host = match mode {
        Mode::Bank => Some(HostAdapter::new(name, &loaded.lora, &model.config)?),
        Mode::MergeSwitch => None,
    };
    Ok(Ready {
        host,
        warnings: loaded.warnings,
        bytes,
    })
}

/// A [`Gpt2`] of `config`'s shape without numbers: every parameter an empty CPU tensor.
pub fn stand_in(config: &GptConfig) -> lora::Result<Gpt2> {
    let device = Device::cpu();
    let empty = |name: &str| -> lora::Result<Param> {
        Ok(Param::frozen(name, Tensor::zeros(&[0], &device)?))
    };
    let linear = |p: &str| -> lora::Result<Linear> {
        Ok(Linear {
            weight: transformer::Weight::Dense(empty(&format!("{p}.weight"))?),
            bias: empty(&format!("{p}.bias"))?,
            adapter: None,
        })
    };
    let norm = |p: &str| -> lora::Result<LayerNorm> {
        Ok(LayerNorm {
            weight: empty(&format!("{p}.weight"))?,
            bias: empty(&format!("{p}.bias"))?,
            eps: config.layer_norm_epsilon,
        })
    };
    let mut h = Vec::with_capacity(config.n_layer);
    for i in 0..config.n_layer {
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
        wte: empty("wte.weight")?,
        wpe: empty("wpe.weight")?,
        h,
        ln_f: norm("ln_f")?,
        lm_head: match config.variant.tie_word_embeddings {
            true => None,
            false => Some(empty("lm_head.weight")?),
        },
        token_adapter: None,
        config: config.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora::{Init, LoraConfig, Target};
    use transformer::Checkpoint;

    fn fixture() -> std::path::PathBuf {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/gpt2-tiny"
        )
        .into()
    }

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "serve-reader-{tag}-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// For a fitting adapter, PEFT's own fixture adapter, and an adapter of another model's
    /// shape: the stand-in's answer is the real model's (the same weights, or the same message).
    #[test]
    fn the_stand_in_checks_as_the_real_model_does() {
        let ckpt = Checkpoint::load(fixture()).unwrap();
        let real = Gpt2::from_checkpoint(&ckpt, &Device::cpu(), false).unwrap();
        let reader = Reader {
            config: real.config.clone(),
            mode: Mode::Bank,
        };
        let root = temp_dir("standin");
        let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V, Target::Fc]);
        cfg.init = Init::BothRandom;
        LoraModel::new(&real, &cfg, 7)
            .unwrap()
            .save_peft(root.join("fits"))
            .unwrap();
        // The same adapter for a model of width 32: every check must fail alike.
        let mut narrow = ckpt.config.clone();
        narrow.n_embd = 32;
        narrow.n_head = 2;
        let small = Gpt2::from_checkpoint(
            &transformer::init_checkpoint(&narrow, 0).unwrap(),
            &Device::cpu(),
            false,
        )
        .unwrap();
        LoraModel::new(&small, &cfg, 7)
            .unwrap()
            .save_peft(root.join("narrow"))
            .unwrap();
        for dir in [
            root.join("fits"),
            fixture().join("adapter"),
            root.join("narrow"),
        ] {
            let want = read_with(&real, Mode::Bank, "x", &dir);
            let got = reader.read("x", &dir);
            match (want, got) {
                (Ok(w), Ok(g)) => {
                    assert_eq!((w.bytes, &w.warnings), (g.bytes, &g.warnings));
                    let (w, g) = (w.host.unwrap(), g.host.unwrap());
                    assert_eq!(w.bytes(), g.bytes());
                    // Equal weights: the same logits once inserted into a bank.
                    assert_eq!(logits_with(&ckpt, w), logits_with(&ckpt, g), "{dir:?}");
                }
                (Err(w), Err(g)) => assert_eq!(w.to_string(), g.to_string(), "{dir:?}"),
                (w, g) => panic!(
                    "{dir:?}: the real model says {:?}, the stand-in {:?}",
                    w.map(|r| r.bytes).map_err(|e| e.to_string()),
                    g.map(|r| r.bytes).map_err(|e| e.to_string())
                ),
            }
        }
        assert!(
            reader.read("x", &root.join("narrow")).is_err(),
            "a width-32 adapter fits?"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    fn logits_with(ckpt: &Checkpoint, host: HostAdapter) -> Vec<f32> {
        let mut model = Gpt2::from_checkpoint(ckpt, &Device::cpu(), false).unwrap();
        let mut bank = lora::AdapterBank::new(&model);
        bank.insert_host(host).unwrap();
        bank.attach(&mut model).unwrap();
        bank.set_active(Some("x")).unwrap();
        let tape = autograd::Tape::inference();
        let ids: Vec<u32> = (0..8).collect();
        model
            .logits(&tape, &ids, 2, 4)
            .unwrap()
            .value
            .to_vec()
            .unwrap()
    }
}
