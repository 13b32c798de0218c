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
//! A stack: (capacity, r, in)    B stack: (capacity, width, r)    scales: (capacity)
//! ```
//!
//! Rows are B·T: the rows of sequence b are b·T..(b+1)·T, so a per-sequence choice of adapter
//! becomes a per-row index (uploaded once per batch shape and shared by every layer).
//!
//! **Memory: each adapter once, in its slot.** An adapter is given a slot, the same index in
//! every site's stack; its A and B live only there (on the device; for the CPU device the
//! stack buffers themselves), the bank keeps no other copy. Inserting writes that one slot
//! (`bank/stack.rs`); removing zeroes it and frees it for the next adapter. Stacks grow by doubling
//! their capacity (so n adapters cost at most 2n slots, each insertion copies O(1) adapters
//! amortized), and a site's stack is dropped once no adapter adapts it. The cost of an adapter
//! is then its own weights, plus the padding below, plus the free slots of the capacity.
//!
//! **Adapters of different shape share a stack by zero padding.** A stack has one rank per site,
//! the largest of the bank's adapters there: an adapter of rank r < r_max fills rows 0..r of its
//! A slot and columns 0..r of its B slot and leaves the rest zero. The extra terms are then
//! 0·x = 0 exactly (x finite), so the sum over k (in the same order) is the same sum. An adapter
//! that does not adapt a site at all (other targets, other layers) is all zeros there. So any
//! adapters for the same base fit one bank: the padding costs compute (r_max per row, at every
//! site of any adapter) and memory, never correctness. An adapter of a rank above a site's
//! r_max re-lays that stack out (copied into one of the larger rank); r_max does not shrink
//! when that adapter leaves, until the site's last adapter does.
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

use crate::error::{Error, Result};
use crate::model::LoraModel;
use crate::target::{Module, Target};

mod host;
mod serve;
mod stack;
#[cfg(test)]
mod tests;
pub use host::HostAdapter;
use serve::BankAdapter;
use stack::SiteStack;

/// Which adapter serves which sequence of the next batches.
#[derive(Clone, Debug, PartialEq)]
pub enum Routing {
    /// Every sequence: one adapter (the active one), or the base model (`None`).
    All(Option<String>),
    /// Sequence b by entry b (`None`: the base model); batches must have this many sequences.
    PerSequence(Vec<Option<String>>),
}

/// What the adapters installed on the Linears read at every forward.
struct Shared {
    /// Slot i of every stack: the adapter's name, or `None` for a free slot. Its length is the
    /// stacks' capacity.
    slots: Vec<Option<String>>,
    /// The stacks of every adapted Linear, by (layer, module), each Linear's in target order.
    linears: BTreeMap<(usize, Module), Vec<SiteStack>>,
    routing: Routing,
    /// The per-row adapter indices for batches of shape (B, T), once made (`None` inside: no row
    /// has an adapter). Cleared whenever the routing or the adapters change.
    rows: Option<((usize, usize), Option<Tensor>)>,
}

/// One adapter of the bank: its slot and the sites it adapts.
struct Entry {
    name: String,
    slot: usize,
    sites: Vec<(usize, Target)>,
}

/// Several adapters over one unmerged base model; see the module doc.
pub struct AdapterBank {
    config: GptConfig,
    device: Device,
    /// In the order they were inserted.
    adapters: Vec<Entry>,
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
                slots: Vec::new(),
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
        self.adapters.iter().map(|e| e.name.as_str()).collect()
    }

    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// Slots of every stack (loaded adapters and free slots).
    pub fn capacity(&self) -> usize {
        self.shared().slots.len()
    }

    /// Bytes of all the stacks on the device: the adapters' weights, their padding and the
    /// free slots.
    pub fn stack_bytes(&self) -> u64 {
        let shared = self.shared();
        shared
            .linears
            .values()
            .flatten()
            .map(SiteStack::bytes)
            .sum()
    }

    /// Adds `lora`'s A and B (copied: later changes to `lora` do not reach the bank) as `name`.
    /// It must be unmerged (the bank adds its term to the unmerged base) and train no biases
    /// (biases belong to the base, which every row shares); see [`HostAdapter::new`].
    pub fn insert(&mut self, name: &str, lora: &LoraModel) -> Result<()> {
        self.check_free(name)?;
        self.insert_host(HostAdapter::new(name, lora, &self.config)?)
    }

    fn check_free(&self, name: &str) -> Result<()> {
        if self.adapters.iter().any(|e| e.name == name) {
            return Err(Error::State(format!(
                "the bank already holds an adapter `{name}`"
            )));
        }
        Ok(())
    }

    /// Adds an adapter read and checked beforehand (on any thread): writes it into a free slot
    /// of every stack it adapts (doubling the capacity when none is free, re-laying out a stack
    /// whose rank is below the adapter's there).
    pub fn insert_host(&mut self, adapter: HostAdapter) -> Result<()> {
        let name = adapter.name.clone();
        self.check_free(&name)?;
        let shape = (self.config.n_layer, self.config.n_embd);
        if adapter.shape != shape {
            return Err(Error::mismatch(
                None,
                format!(
                    "adapter `{name}` was checked for a model of {} layers and width {}, the \
                     bank's has {} and {}",
                    adapter.shape.0, adapter.shape.1, shape.0, shape.1
                ),
            ));
        }
        let device = self.device.clone();
        let mut shared = self
            .shared
            .lock()
            .expect("no forward panicked while holding the bank");
        let slot = match shared.slots.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                let old = shared.slots.len();
                let capacity = (2 * old).max(1);
                for s in shared.linears.values_mut().flatten() {
                    let r = s.r;
                    s.relayout(capacity, r)?;
                }
                shared.slots.resize(capacity, None);
                old
            }
        };
        let capacity = shared.slots.len();
        for site in &adapter.sites {
            let stacks = shared
                .linears
                .entry((site.layer, site.target.module()))
                .or_default();
            let i = match stacks.binary_search_by_key(&site.target, |s| s.target) {
                Ok(i) => i,
                Err(i) => {
                    stacks.insert(
                        i,
                        SiteStack::new(site.target, &self.config, capacity, site.r, &device)?,
                    );
                    i
                }
            };
            let stack = &mut stacks[i];
            if site.r > stack.r {
                stack.relayout(capacity, site.r)?;
            }
            stack.write(slot, site)?;
            stack.users += 1;
        }
        shared.slots[slot] = Some(name.clone());
        shared.rows = None;
        drop(shared);
        self.adapters.push(Entry {
            name,
            slot,
            sites: adapter.sites.iter().map(|s| (s.layer, s.target)).collect(),
        });
        Ok(())
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

    /// Deletes adapter `name`: zeroes its slot (free for the next adapter), and drops the stacks
    /// of sites no other adapter adapts. A routing that named it is reset to the base model for
    /// every sequence (so no batch is ever served by an adapter other than the one asked for).
    pub fn remove(&mut self, name: &str) -> Result<()> {
        let i = self.index(name)?;
        let entry = self.adapters.remove(i);
        let mut shared = self.shared();
        for &(layer, target) in &entry.sites {
            let key = (layer, target.module());
            let Some(stacks) = shared.linears.get_mut(&key) else {
                continue;
            };
            let Some(i) = stacks.iter().position(|s| s.target == target) else {
                continue;
            };
            stacks[i].users -= 1;
            if stacks[i].users == 0 {
                stacks.remove(i);
                if stacks.is_empty() {
                    shared.linears.remove(&key);
                }
            } else {
                stacks[i].clear(entry.slot)?;
            }
        }
        shared.slots[entry.slot] = None;
        if self.adapters.is_empty() {
            shared.slots.clear(); // every stack is gone with its last adapter
        }
        shared.rows = None;
        let named = match &shared.routing {
            Routing::All(a) => a.as_deref() == Some(name),
            Routing::PerSequence(v) => v.iter().any(|a| a.as_deref() == Some(name)),
        };
        if named {
            shared.routing = Routing::All(None);
        }
        Ok(())
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
            .position(|e| e.name == name)
            .ok_or_else(|| {
                Error::State(format!(
                    "the bank holds no adapter `{name}` (it holds: {})",
                    self.names().join(", ")
                ))
            })
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
