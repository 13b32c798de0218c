//! [`LoraModel`]: the adapters of one GPT-2, and what can be done with them as a whole:
//! attach them to the model (freezing the base), detach them, merge them into the weights and
//! back, list their parameters for the optimizer, count parameters.
//!
//! A [`LoraModel`] owns no model. It holds handles to its A and B tensors (shared with the copies
//! attached to the model's Linears) and works on the [`Gpt2`] it is given:
//!
//! | state | the forward computes |
//! |---|---|
//! | attached, unmerged | x·W0 + b + s·(x·Aᵀ)·Bᵀ: training, and inference that can switch cheaply |
//! | attached, merged | x·(W0 + s·Aᵀ·Bᵀ) + b: the adapter adds nothing, the cost is the base model's |
//! | detached, merged | the same (PEFT's merge_and_unload) |
//! | detached, unmerged | the base model |
//!
//! Switching task for inference: `a.unmerge(&m)?; b.merge(&m)?` with both detached (or detach
//! one, attach the other, for training).
//!
//! Biases (bias modes `all` and `lora_only`) are the model's own parameters: training changes
//! them in the model, and biases carried by a loaded file are written into the model when it
//! is attached. Merging folds A and B only, so an adapter with trained biases takes full effect
//! only once attached, and detaching or unmerging does not restore the old biases. The same
//! holds for what a loaded PEFT adapter replaces in the model: `modules_to_save` copies of
//! layer norms and trainable-token rows of `wte`.
//!
//! A loaded adapter may carry PEFT features computed here for inference and merging only
//! ([`LoraModel::eval_only`]: DoRA, `lora_bias`, `modules_to_save`, trainable tokens, LoRA on
//! `wte` or the tied `lm_head`): such an
//! adapter is not saved and not served by an [`crate::AdapterBank`]; its
//! [`LoraModel::trainable_params`] are A and B alone, so it must not be trained as if it were
//! PEFT's (DoRA's magnitude, for one, would stay fixed). Adapters made here with
//! [`LoraConfig::use_dora`] or `modules_to_save` train those parts and save them.
//!
//! With a PiSSA or OLoRA init ([`crate::base_init`]), [`LoraModel::new`] changes the model's
//! adapted weights into the residual W0 − s·B0·A0 and keeps A0 and B0, so that
//! [`LoraModel::save_peft`] writes the plain LoRA that works on the original W0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use autograd::{Param, Trainable};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tensor::ops::elementwise::scale;
use tensor::ops::slice::write_axis;
use tensor::{Device, Tensor};
use transformer::{Gpt2, NamedTensor};

use crate::base_init;
use crate::config::{Init, LoraConfig, ParamCount, Site, bias_trains, layers_phrase, module_saved};
use crate::dora::{Dora, column_norms};
use crate::error::{Error, Result};
use crate::linear::{DropoutSeeds, LoraAdapter, LoraUpdate};
use crate::target::{Module, Target};
use crate::token_lora::TokenLora;

/// One site's tensors as a file gives them: A (r, in), B (width, r), and PEFT's extras.
pub(crate) struct SiteWeights {
    pub site: Site,
    pub a: Tensor,
    pub b: Tensor,
    /// `lora_B.bias` (width).
    pub lora_bias: Option<Tensor>,
    /// DoRA's magnitude m (width).
    pub magnitude: Option<Tensor>,
}

/// Rows of the (tied) token embedding an adapter replaces: PEFT's trainable tokens.
#[derive(Clone, Debug)]
pub(crate) struct TokenRows {
    pub ids: Vec<usize>,
    /// (ids.len(), C) row-major.
    pub rows: Vec<f32>,
}

/// The adapters of one model: a config, and one [`LoraUpdate`] per [`Site`].
pub struct LoraModel {
    pub config: LoraConfig,
    /// Written as `base_model_name_or_path` when saving.
    pub base_model: Option<String>,
    sites: Vec<(Site, LoraUpdate)>,
    merged: Arc<AtomicBool>,
    seeds: Arc<DropoutSeeds>,
    attached: bool,
    /// Trainable parameters of the model (biases of bias mode `all` / `lora_only`, every
    /// parameter of `modules_to_save`), while attached.
    biases: Vec<Trainable>,
    /// Bias values to put into the model at the next attach (loaded from a file, or kept
    /// from the last detach): (size-table name, shape, values). A loaded adapter's
    /// `modules_to_save` copies (layer norms) travel here too.
    bias_values: Vec<NamedTensor>,
    /// Rows of `wte` to write at the next attach (trainable tokens of a loaded adapter).
    token_rows: Option<TokenRows>,
    /// A loaded adapter's LoRA on `wte` / `lm_head` and copy of `wte` ([`crate::token_lora`]).
    token: Option<TokenLora>,
    /// Features of a loaded adapter that this crate evaluates and merges but neither trains nor
    /// saves (DoRA, lora_bias, modules_to_save, trainable tokens).
    pub(crate) eval_only: Vec<String>,
    /// With a PiSSA or OLoRA init: every site's A0 and B0 on the host (sites' order), which
    /// saving subtracts again ([`crate::base_init`]); empty otherwise.
    pub(crate) initial: Vec<(Vec<f32>, Vec<f32>)>,
}

/// wte[id] ← row for every trainable token (the tied head reads the same rows).
fn write_token_rows(wte: &Param, tokens: &TokenRows) -> Result<()> {
    let table = wte.value();
    let c = table.shape()[1];
    let device = table.device();
    for (k, &id) in tokens.ids.iter().enumerate() {
        let row = Tensor::from_vec(tokens.rows[k * c..(k + 1) * c].to_vec(), &[1, c], &device)?;
        write_axis(table, 0, id, &row, false)?;
    }
    Ok(())
}

/// `h.{layer}.{module}` and, for q, k, v, the slice: the stem of A's and B's names.
pub fn site_name(site: &Site) -> String {
    let stem = format!("h.{}.{}", site.layer, site.target.module().path());
    match site.target {
        Target::Q | Target::K | Target::V => format!("{stem}.{}", site.target.name()),
        _ => stem,
    }
}

fn device_of(model: &Gpt2) -> Device {
    model.wte.value().device()
}

impl LoraModel {
    /// Fresh adapters for `model` as `config` says (A random, B zero by default), detached.
    /// `seed` draws A (and B for [`crate::Init::BothRandom`]) and seeds dropout.
    ///
    /// With [`crate::Init::Pissa`] or [`crate::Init::Olora`], A and B come from `model`'s
    /// weights, and **those weights are changed** into the residual W0 − s·Aᵀ·Bᵀ
    /// ([`crate::base_init`]): the adapters belong to this model from then on.
    pub fn new(model: &Gpt2, config: &LoraConfig, seed: u64) -> Result<LoraModel> {
        let sites = config.sites(&model.config)?;
        let device = device_of(model);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut weights = Vec::with_capacity(sites.len());
        let mut initial = Vec::new();
        for site in sites {
            let (a, b) = if config.init.changes_base() {
                let (a0, b0) = Self::init_from_base(model, &site, config.init)?;
                let a = Tensor::from_vec(a0.clone(), &[site.r, site.in_features], &device)?;
                let b = Tensor::from_vec(b0.clone(), &[site.width, site.r], &device)?;
                initial.push((a0, b0));
                (a, b)
            } else {
                LoraUpdate::init(&site, config.init, &mut rng, &device)?
            };
            // DoRA's m starts at ‖W0‖ per column (PEFT's), so the model starts at W0.
            let magnitude = if config.use_dora {
                let w = Self::base_weight(model, &site, "DoRA")?;
                let norms = column_norms(w, None)?.iter().map(|n| *n as f32).collect();
                Some(Tensor::from_vec(norms, &[site.width], &device)?)
            } else {
                None
            };
            weights.push(SiteWeights {
                site,
                a,
                b,
                lora_bias: None,
                magnitude,
            });
        }
        let mut lora = Self::from_weights(config.clone(), weights, Vec::new(), seed);
        lora.initial = initial;
        Ok(lora)
    }

    /// PiSSA's or OLoRA's A0, B0 for `site` from the model's W, whose columns of the site are
    /// replaced by the residual.
    fn init_from_base(model: &Gpt2, site: &Site, init: Init) -> Result<(Vec<f32>, Vec<f32>)> {
        let w = Self::base_weight(model, site, "PiSSA and OLoRA initialisation")?;
        let (n_in, out) = (w.shape()[0], w.shape()[1]);
        let all = w.to_vec()?;
        let (c0, width) = (site.col0, site.width);
        let cols: Vec<f32> = (0..n_in)
            .flat_map(|i| all[i * out + c0..i * out + c0 + width].iter().copied())
            .collect();
        let (r, s) = (site.r, site.scale);
        let made = match init {
            Init::Pissa => base_init::pissa(&cols, n_in, width, r, s),
            _ => base_init::olora(&cols, n_in, width, r, s),
        }
        .map_err(|e| Error::config(format!("{}: {e}", site_name(site))))?;
        let residual = Tensor::from_vec(made.residual, &[n_in, width], &w.device())?;
        write_axis(w, 1, c0, &residual, false)?;
        Ok((made.a, made.b))
    }

    /// [`LoraModel::new`], then [`LoraModel::attach`]: the usual way to start LoRA training.
    pub fn inject(model: &mut Gpt2, config: &LoraConfig, seed: u64) -> Result<LoraModel> {
        let mut lora = Self::new(model, config, seed)?;
        lora.attach(model)?;
        Ok(lora)
    }

    /// A model from given A, B tensors (A: (r, in), B: (width, r) per site).
    pub(crate) fn from_weights(
        config: LoraConfig,
        weights: Vec<SiteWeights>,
        bias_values: Vec<NamedTensor>,
        seed: u64,
    ) -> LoraModel {
        let merged = Arc::new(AtomicBool::new(false));
        let seeds = Arc::new(DropoutSeeds::new(seed));
        let sites = weights
            .into_iter()
            .map(|w| {
                let (site, a, b) = (w.site, w.a, w.b);
                let name = site_name(&site);
                let lora = LoraUpdate {
                    a: Param::trainable(format!("{name}.lora_A"), a),
                    b: Param::trainable(format!("{name}.lora_B"), b),
                    lora_bias: w
                        .lora_bias
                        .map(|t| Param::frozen(format!("{name}.lora_B.bias"), t)),
                    // Trained when the config asks for DoRA (a loaded adapter's is frozen).
                    dora: w.magnitude.map(|m| {
                        let name = format!("{name}.lora_magnitude_vector");
                        Arc::new(Dora::new(if config.use_dora {
                            Param::trainable(name, m)
                        } else {
                            Param::frozen(name, m)
                        }))
                    }),
                    alpha: site.alpha,
                    scale: site.scale,
                    col0: site.col0,
                    dropout: config.dropout,
                    merged: merged.clone(),
                    seeds: seeds.clone(),
                };
                (site, lora)
            })
            .collect();
        LoraModel {
            config,
            base_model: None,
            sites,
            merged,
            seeds,
            attached: false,
            biases: Vec::new(),
            bias_values,
            token_rows: None,
            token: None,
            eval_only: Vec::new(),
            initial: Vec::new(),
        }
    }

    /// A loaded adapter's trainable-token rows, and the features it holds that are for
    /// inference only.
    pub(crate) fn set_loaded_extras(&mut self, tokens: Option<TokenRows>, eval_only: Vec<String>) {
        self.token_rows = tokens;
        self.eval_only = eval_only;
    }

    /// A loaded adapter's adapters on the token embedding's two uses, sharing the merge state.
    pub(crate) fn set_token_lora(&mut self, token: Option<TokenLora>) {
        self.token = token.map(|t| TokenLora {
            merged: self.merged.clone(),
            ..t
        });
    }

    /// The features of a loaded adapter that this crate evaluates and merges (as PEFT does) but
    /// does not train or save: empty for adapters made here or plain LoRA files. Training such
    /// an adapter, or saving it, is refused with this list.
    pub fn eval_only(&self) -> &[String] {
        &self.eval_only
    }

    /// Every site with its adapter, layer by layer.
    pub fn sites(&self) -> impl Iterator<Item = (&Site, &LoraUpdate)> {
        self.sites.iter().map(|(s, l)| (s, l))
    }

    /// The Linear `site` adapts, or an error if the model lacks that layer.
    fn base_linear<'m>(model: &'m Gpt2, site: &Site) -> Result<&'m transformer::model::Linear> {
        let block = model.h.get(site.layer).ok_or_else(|| {
            let phrase = layers_phrase(model.h.len());
            Error::mismatch(None, format!("{}: the model has {phrase}", site_name(site)))
        })?;
        Ok(site.target.module().linear(block))
    }

    /// W: (in, out) of the Linear `site` adapts, in f32; `what` needs its values (an error names
    /// the weight when the base is quantized).
    fn base_weight<'m>(model: &'m Gpt2, site: &Site, what: &str) -> Result<&'m Tensor> {
        Ok(Self::base_linear(model, site)?.weight.dense(what)?.value())
    }

    /// Checks that every site fits `model`: the layer exists, W has the site's input width and
    /// enough columns, and A lives on the model's device.
    pub fn check_fits(&self, model: &Gpt2) -> Result<()> {
        let device = device_of(model);
        for (site, lora) in &self.sites {
            let w = Self::base_linear(model, site)?.weight.shape();
            let (a, b) = (lora.a.value(), lora.b.value());
            if w[0] != lora.in_features() || w[1] < site.col0 + lora.width() {
                let message = format!(
                    "{}: A is {:?} and B {:?} (columns {}..{}), but the model's W is {w:?}",
                    site_name(site),
                    a.shape(),
                    b.shape(),
                    site.col0,
                    site.col0 + lora.width()
                );
                return Err(Error::mismatch(None, message));
            }
            if !a.device().same(&device) {
                let message = format!(
                    "{}: the adapter is on {:?}, the model on {device:?}",
                    site_name(site),
                    a.device()
                );
                return Err(Error::mismatch(None, message));
            }
        }
        Ok(())
    }

    /// Puts the adapters on the model's Linears and makes only them (and the biases the bias
    /// mode names) trainable: every base parameter is frozen, so it gets no gradient buffer,
    /// no optimizer state and no backward work for its own gradient. Biases carried by a loaded
    /// adapter file are written into the model here (and stay there after a detach).
    pub fn attach(&mut self, model: &mut Gpt2) -> Result<()> {
        if self.attached {
            return Err(Error::State("these adapters are already attached".into()));
        }
        self.check_fits(model)?;
        let mut per_linear: BTreeMap<(usize, Module), LoraAdapter> = BTreeMap::new();
        for (site, lora) in &self.sites {
            let key = (site.layer, site.target.module());
            per_linear.entry(key).or_default().parts.push(lora.clone());
        }
        for (layer, module) in per_linear.keys() {
            if module.linear(&model.h[*layer]).adapter.is_some() {
                return Err(Error::State(format!(
                    "h.{layer}.{} already has an adapter: detach the LoraModel that put it there first",
                    module.path()
                )));
            }
        }
        if self.token.is_some() && model.token_adapter.is_some() {
            return Err(Error::State(
                "the model's token embedding already has an adapter: detach it first".into(),
            ));
        }
        let device = device_of(model);
        let sites: Vec<Site> = self.sites.iter().map(|(s, _)| s.clone()).collect();
        for p in model.params_mut() {
            p.freeze();
            // Biases the adapter file carries replace the model's (PEFT loads them the same way).
            if let Some((name, shape, v)) = self.bias_values.iter().find(|(n, _, _)| n == p.name())
            {
                *p = Param::frozen(name.clone(), Tensor::from_vec(v.clone(), shape, &device)?);
            }
            if bias_trains(self.config.bias, p.name(), &sites)
                || module_saved(&self.config.modules_to_save, p.name())
            {
                p.unfreeze();
                self.biases.extend(p.as_trainable().cloned());
            }
        }
        self.bias_values.clear();
        if let Some(tokens) = self.token_rows.take() {
            write_token_rows(&model.wte, &tokens)?;
        }
        // DoRA's f comes from the unmerged W0 (merging computed it already, and W now holds
        // the merged weight).
        for (site, lora) in self.sites.iter().filter(|_| !self.is_merged()) {
            if let Some(dora) = &lora.dora {
                let linear = site.target.module().linear(&model.h[site.layer]);
                dora.prepare(linear.weight.dense("DoRA")?, &linear.bias, lora)?;
            }
        }
        for ((layer, module), adapter) in per_linear {
            module.linear_mut(&mut model.h[layer]).adapter = Some(Box::new(adapter));
        }
        if let Some(t) = &self.token {
            model.token_adapter = Some(Box::new(t.clone()));
        }
        self.attached = true;
        Ok(())
    }

    /// Takes the adapters off the model's Linears (a merged update stays in W: detaching a
    /// merged model is PEFT's merge_and_unload) and freezes the biases that were trained.
    pub fn detach(&mut self, model: &mut Gpt2) -> Result<()> {
        if !self.attached {
            return Err(Error::State("these adapters are not attached".into()));
        }
        for (site, _) in &self.sites {
            site.target
                .module()
                .linear_mut(&mut model.h[site.layer])
                .adapter = None;
        }
        if let Some(t) = &self.token {
            model.token_adapter = None;
            if self.is_merged() {
                t.unload(model)?;
            }
        }
        self.bias_values = self.biases_on_host()?;
        let names: Vec<String> = self.biases.drain(..).map(|t| t.name).collect();
        for p in model.params_mut() {
            if names.iter().any(|n| n == p.name()) {
                p.freeze();
            }
        }
        self.attached = false;
        Ok(())
    }

    pub fn is_attached(&self) -> bool {
        self.attached
    }

    pub fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Relaxed)
    }

    /// W ← W + s·Aᵀ·Bᵀ for every site, on the device (a q/k/v site writes its columns only).
    /// Returns false, changing nothing, when already merged.
    pub fn merge(&self, model: &Gpt2) -> Result<bool> {
        self.add_to_weights(model, 1.0, true)
    }

    /// W ← W − s·Aᵀ·Bᵀ, undoing [`LoraModel::merge`] up to f32 rounding (A and B must not have
    /// changed in between). Returns false, changing nothing, when not merged.
    pub fn unmerge(&self, model: &Gpt2) -> Result<bool> {
        self.add_to_weights(model, -1.0, false)
    }

    fn add_to_weights(&self, model: &Gpt2, sign: f32, merging: bool) -> Result<bool> {
        if self.is_merged() == merging {
            return Ok(false);
        }
        self.check_fits(model)?;
        for (site, lora) in &self.sites {
            let linear = site.target.module().linear(&model.h[site.layer]);
            let w = Self::base_weight(model, site, "merging")?;
            match &lora.dora {
                // W ← f ⊙ (W0 + ΔW), and back W0 = W / f − ΔW (f per output column).
                Some(dora) if merging => {
                    dora.prepare(linear.weight.dense("DoRA")?, &linear.bias, lora)?;
                    dora.merge(w, lora)?;
                }
                Some(dora) => dora.unmerge(w, lora)?,
                None => {
                    let delta = scale(&lora.delta_weight()?, sign)?; // ±s·Aᵀ·Bᵀ: (in, width)
                    write_axis(w, 1, site.col0, &delta, true)?;
                }
            }
            if let Some(b) = &lora.lora_bias {
                // b ← b ± s·b_B.
                let db = scale(b.value(), sign * lora.scale)?;
                write_axis(linear.bias.value(), 0, site.col0, &db, true)?;
            }
        }
        if let Some(t) = &self.token {
            t.add_to_wte(&model.wte, sign)?;
        }
        self.merged.store(merging, Ordering::Relaxed);
        Ok(true)
    }

    /// What the optimizer trains: every A and B (and DoRA's m), then the trainable biases and
    /// `modules_to_save` parameters (while attached).
    pub fn trainable_params(&self) -> Vec<Trainable> {
        let lora = self.sites.iter().flat_map(|(_, l)| {
            [
                Some(&l.a),
                Some(&l.b),
                l.dora.as_ref().map(|d| &d.magnitude),
            ]
            .into_iter()
            .flatten()
        });
        lora.filter_map(|p| p.as_trainable().cloned())
            .chain(self.biases.iter().cloned())
            .collect()
    }

    /// Bytes of all A and B.
    pub fn lora_bytes(&self) -> u64 {
        self.sites
            .iter()
            .map(|(_, l)| l.a.value().bytes() + l.b.value().bytes())
            .sum()
    }

    /// Trainable and total parameters of `model` with these adapters.
    pub fn param_count(&self, model: &Gpt2) -> ParamCount {
        let lora: usize = self
            .sites
            .iter()
            .map(|(_, l)| {
                let m = l.dora.as_ref().map_or(0, |d| d.magnitude.value().numel());
                l.a.value().numel() + l.b.value().numel() + m
            })
            .sum();
        let base = model.num_params(); // quantized weights included
        let biases: usize = self.biases.iter().map(|t| t.value.numel()).sum();
        ParamCount {
            trainable: lora + biases,
            all: base + lora,
        }
    }

    /// Restart the dropout seeds from `seed` (to replay a run).
    pub fn set_dropout_seed(&self, seed: u64) {
        self.seeds.reset(seed);
    }

    /// The trainable biases' values (size-table name, shape, values), from the model while
    /// attached, else as kept.
    pub(crate) fn biases_on_host(&self) -> Result<Vec<NamedTensor>> {
        if !self.attached {
            return Ok(self.bias_values.clone());
        }
        self.biases
            .iter()
            .map(|t| Ok((t.name.clone(), t.value.shape().to_vec(), t.value.to_vec()?)))
            .collect()
    }
}
