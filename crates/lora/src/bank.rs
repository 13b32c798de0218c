//! [`AdapterBank`]: many adapters over one unmerged base model, each sequence of a batch served
//! by its own adapter (or by none) in one forward pass. Forward only: the bank serves adapters,
//! it does not train them.
//!
//! Merging (see [`crate::model`]) makes one adapter free at inference, but only one at a time: a
//! server holding adapters for many tasks or users would have to merge, run and unmerge per
//! request. Punica (Chen et al. 2023) and S-LoRA (Sheng et al. 2023) keep W0 unmerged and batch
//! requests for *different* adapters together: the base product x·W0 is shared by every row, and
//! each row adds the term of its own adapter a_n,
//!
//! ```text
//! y[n] = x[n]·W0 + b + s[a_n]·(x[n]·A[a_n]ᵀ)·B[a_n]ᵀ       (zero term where a_n = none)
//! ```
//!
//! computed for all rows at once by the segmented gather matrix-vector product
//! ([`tensor::ops::sgmv`]) over the adapters' A and B stacked per site:
//!
//! ```text
//! A stack: (n_adapters, r, in)    B stack: (n_adapters, width, r)    scales: (n_adapters)
//! ```
//!
//! Rows are B·T: the rows of sequence b are b·T..(b+1)·T, so a per-sequence choice of adapter
//! becomes a per-row index (uploaded once per batch shape and shared by every layer).
//!
//! **Adapters of different shape share a stack by zero padding.** A stack has one rank per site,
//! the largest of the bank's adapters there: an adapter of rank r < r_max fills rows 0..r of its
//! A slot and columns 0..r of its B slot and leaves the rest zero. The extra terms are then
//! 0·x = 0 exactly (x finite), so the sum over k (in the same order) is the same sum. An adapter
//! that does not adapt a site at all (other targets, other layers) is all zeros there. So any
//! adapters for the same base fit one bank: the padding costs compute (r_max per row, at every
//! site of any adapter), never correctness.
//!
//! ```
//! use autograd::Tape;
//! use lora::{AdapterBank, Init, LoraConfig, LoraModel, Target};
//! use transformer::{Checkpoint, Gpt2};
//! use tensor::Device;
//!
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/gpt2-tiny");
//! let mut model = Gpt2::from_checkpoint(&Checkpoint::load(dir)?, &Device::cpu(), false)?;
//! let mut cfg = LoraConfig::new(4, 8.0, &[Target::Q, Target::V]);
//! cfg.init = Init::BothRandom;
//! let mut bank = AdapterBank::new(&model);
//! bank.insert("poems", &LoraModel::new(&model, &cfg, 1)?)?;
//! bank.insert("recipes", &LoraModel::new(&model, &cfg, 2)?)?;
//! bank.attach(&mut model)?;
//! // Three sequences of 4 tokens: one per adapter, and one on the base model.
//! bank.route(&[Some("recipes"), None, Some("poems")])?;
//! let logits = model.logits(&Tape::inference(), &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 3, 4)?;
//! assert_eq!(logits.shape(), [12, 256]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use tensor::{Device, Tensor};
use transformer::{Gpt2, GptConfig};

use crate::config::BiasMode;
use crate::error::{Error, Result};
use crate::model::{LoraModel, site_name};
use crate::target::{Module, Target};

mod serve;
use serve::BankAdapter;

/// Which adapter serves which sequence of the next batches.
#[derive(Clone, Debug, PartialEq)]
pub enum Routing {
    /// Every sequence: one adapter (the active one), or the base model (`None`).
    All(Option<String>),
    /// Sequence b by entry b (`None`: the base model); batches must have this many sequences.
    PerSequence(Vec<Option<String>>),
}

/// One site of one adapter, on the host: A (r, in) and B (width, r) row-major.
struct HostSite {
    layer: usize,
    target: Target,
    r: usize,
    scale: f32,
    a: Vec<f32>,
    b: Vec<f32>,
}

/// The stacked adapters of one site, on the bank's device.
struct SiteStack {
    /// First output column of the Linear the site adds into.
    col0: usize,
    /// (n_adapters, r_max, in).
    a: Tensor,
    /// (n_adapters, width, r_max).
    b: Tensor,
    /// (n_adapters).
    scales: Tensor,
}

/// What the adapters installed on the Linears read at every forward.
struct Shared {
    names: Vec<String>,
    /// The stacks of every adapted Linear, by (layer, module).
    linears: BTreeMap<(usize, Module), Vec<SiteStack>>,
    routing: Routing,
    /// The per-row adapter indices for batches of shape (B, T), once made (`None` inside: no row
    /// has an adapter). Cleared whenever the routing or the adapters change.
    rows: Option<((usize, usize), Option<Tensor>)>,
}

/// Several adapters over one base model; see the module doc.
pub struct AdapterBank {
    config: GptConfig,
    device: Device,
    adapters: Vec<(String, Vec<HostSite>)>,
    shared: Arc<Mutex<Shared>>,
    attached: bool,
}

impl AdapterBank {
    /// An empty bank for `model` (its config and device), routing every sequence to the base.
    pub fn new(model: &Gpt2) -> AdapterBank {
        AdapterBank {
            config: model.config.clone(),
            device: model.wte.value().device(),
            adapters: Vec::new(),
            shared: Arc::new(Mutex::new(Shared {
                names: Vec::new(),
                linears: BTreeMap::new(),
                routing: Routing::All(None),
                rows: None,
            })),
            attached: false,
        }
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        self.shared
            .lock()
            .expect("no forward panicked while holding the bank")
    }

    /// The adapters' names, in the order they were inserted.
    pub fn names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// Adds `lora`'s A and B (copied: later changes to `lora` do not reach the bank) as `name`.
    /// It must be unmerged (the bank adds its term to the unmerged base) and train no biases
    /// (biases belong to the base, which every row shares).
    pub fn insert(&mut self, name: &str, lora: &LoraModel) -> Result<()> {
        if self.adapters.iter().any(|(n, _)| n == name) {
            return Err(Error::State(format!(
                "the bank already holds an adapter `{name}`"
            )));
        }
        if lora.is_merged() {
            return Err(Error::State(format!(
                "adapter `{name}` is merged into a model's weights: unmerge it first (the bank \
                 adds every adapter's term to the unmerged base)"
            )));
        }
        if !lora.eval_only().is_empty() {
            return Err(Error::config(format!(
                "adapter `{name}` holds {}: a bank serves plain LoRA (A and B) over a shared base; \
                 evaluate or merge this adapter on its own model instead",
                lora.eval_only().join(", ")
            )));
        }
        if lora.config.bias != BiasMode::None {
            return Err(Error::config(format!(
                "adapter `{name}` trains biases (bias mode `{}`); a bank serves A and B only, \
                 since the biases are the base model's, shared by every sequence",
                lora.config.bias.name()
            )));
        }
        let c = self.config.n_embd;
        let mut sites = Vec::new();
        for (site, l) in lora.sites() {
            let (col0, width) = site.target.columns(&self.config);
            let fits = site.layer < self.config.n_layer
                && l.in_features() == site.target.module().shape(&self.config).0
                && (l.col0, l.width()) == (col0, width);
            if !fits {
                return Err(Error::mismatch(
                    None,
                    format!(
                        "adapter `{name}`, {}: A is {:?} and B {:?}, which do not fit a model \
                         of {} layers and width {c}",
                        site_name(site),
                        l.a.value().shape(),
                        l.b.value().shape(),
                        self.config.n_layer
                    ),
                ));
            }
            sites.push(HostSite {
                layer: site.layer,
                target: site.target,
                r: l.r(),
                scale: l.scale,
                a: l.a.value().to_vec()?,
                b: l.b.value().to_vec()?,
            });
        }
        self.adapters.push((name.to_string(), sites));
        self.rebuild()
    }

    /// Reads a PEFT adapter directory ([`LoraModel::load_peft`]) for `model` and inserts it as
    /// `name`; returns the loader's warnings.
    pub fn load_peft(
        &mut self,
        name: &str,
        dir: impl AsRef<Path>,
        model: &Gpt2,
    ) -> Result<Vec<String>> {
        let loaded = LoraModel::load_peft(dir, model)?;
        self.insert(name, &loaded.lora)?;
        Ok(loaded.warnings)
    }

    /// Deletes adapter `name`. A routing that named it is reset to the base model for every
    /// sequence (so no batch is ever served by an adapter other than the one asked for).
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        self.adapters.remove(i);
        {
            let mut shared = self.shared();
            let named = match &shared.routing {
                Routing::All(a) => a.as_deref() == Some(name),
                Routing::PerSequence(v) => v.iter().any(|a| a.as_deref() == Some(name)),
            };
            if named {
                shared.routing = Routing::All(None);
            }
        }
        self.rebuild()
    }

    /// Serves every sequence with adapter `name`, or with the base model for `None`.
    pub fn set_active(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            self.index(n)?;
        }
        self.set_routing(Routing::All(name.map(str::to_string)));
        Ok(())
    }

    /// Serves sequence b of the next batches with `per_sequence[b]` (`None`: the base model).
    pub fn route(&mut self, per_sequence: &[Option<&str>]) -> Result<()> {
        for n in per_sequence.iter().flatten() {
            self.index(n)?;
        }
        let names = per_sequence.iter().map(|n| n.map(str::to_string)).collect();
        self.set_routing(Routing::PerSequence(names));
        Ok(())
    }

    /// The current routing.
    pub fn routing(&self) -> Routing {
        self.shared().routing.clone()
    }

    fn set_routing(&self, routing: Routing) {
        let mut shared = self.shared();
        shared.routing = routing;
        shared.rows = None;
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.adapters
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| {
                Error::State(format!(
                    "the bank holds no adapter `{name}` (it holds: {})",
                    self.names().join(", ")
                ))
            })
    }

    /// Stacks every site any adapter adapts (zero-padded, see the module doc) on the device.
    fn rebuild(&mut self) -> Result<()> {
        let n = self.adapters.len();
        // Every (layer, target) of any adapter, with the largest rank there.
        let mut r_max: BTreeMap<(usize, Target), usize> = BTreeMap::new();
        for s in self.adapters.iter().flat_map(|(_, sites)| sites) {
            let r = r_max.entry((s.layer, s.target)).or_default();
            *r = (*r).max(s.r);
        }
        let mut linears: BTreeMap<(usize, Module), Vec<SiteStack>> = BTreeMap::new();
        for (&(layer, target), &r) in &r_max {
            let n_in = target.module().shape(&self.config).0;
            let (col0, width) = target.columns(&self.config);
            let mut a = vec![0.0; n * r * n_in];
            let mut b = vec![0.0; n * width * r];
            let mut scales = vec![0.0; n];
            for (i, (_, sites)) in self.adapters.iter().enumerate() {
                let Some(s) = sites
                    .iter()
                    .find(|s| (s.layer, s.target) == (layer, target))
                else {
                    continue; // this adapter leaves the site alone: its slot stays zero
                };
                // A's r rows go first in its r_max rows; B's r columns first in each row.
                a[i * r * n_in..][..s.r * n_in].copy_from_slice(&s.a);
                for (j, row) in s.b.chunks(s.r).enumerate() {
                    b[(i * width + j) * r..][..s.r].copy_from_slice(row);
                }
                scales[i] = s.scale;
            }
            linears
                .entry((layer, target.module()))
                .or_default()
                .push(SiteStack {
                    col0,
                    a: Tensor::from_vec(a, &[n, r, n_in], &self.device)?,
                    b: Tensor::from_vec(b, &[n, width, r], &self.device)?,
                    scales: Tensor::from_vec(scales, &[n], &self.device)?,
                });
        }
        let mut shared = self.shared();
        shared.names = self.adapters.iter().map(|(n, _)| n.clone()).collect();
        shared.linears = linears;
        shared.rows = None;
        Ok(())
    }

    /// Installs the bank on every Linear of `model` (each adds the terms of the sites it has,
    /// and nothing while it has none, so adapters inserted later are served too).
    pub fn attach(&mut self, model: &mut Gpt2) -> Result<()> {
        if self.attached {
            return Err(Error::State("this bank is already attached".into()));
        }
        let (n_layer, c) = (model.config.n_layer, model.config.n_embd);
        if (n_layer, c) != (self.config.n_layer, self.config.n_embd) {
            return Err(Error::mismatch(
                None,
                format!(
                    "the bank was made for {} layers of width {}, \
                     the model has {n_layer} of width {c}",
                    self.config.n_layer, self.config.n_embd
                ),
            ));
        }
        for (layer, block) in model.h.iter().enumerate() {
            if let Some(m) = Module::ALL
                .into_iter()
                .find(|m| m.linear(block).adapter.is_some())
            {
                return Err(Error::State(format!(
                    "h.{layer}.{} already has an adapter: the bank serves over an unadapted base",
                    m.path()
                )));
            }
        }
        for (layer, block) in model.h.iter_mut().enumerate() {
            for module in Module::ALL {
                module.linear_mut(block).adapter = Some(Box::new(BankAdapter {
                    linear: (layer, module),
                    shared: self.shared.clone(),
                }));
            }
        }
        self.attached = true;
        Ok(())
    }

    /// Takes the bank off the model's Linears.
    pub fn detach(&mut self, model: &mut Gpt2) -> Result<()> {
        if !self.attached {
            return Err(Error::State("this bank is not attached".into()));
        }
        for block in &mut model.h {
            for module in Module::ALL {
                module.linear_mut(block).adapter = None;
            }
        }
        self.attached = false;
        Ok(())
    }
}
