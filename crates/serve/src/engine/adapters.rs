//! Where the engine keeps its adapters, in one of two ways:
//!
//! - [`Mode::Bank`] (the server): one [`AdapterBank`] attached to the unmerged base; every step
//!   routes each row to its own adapter (or to none), and the bank adds the adapters' terms by
//!   SGMV. Sequences of any adapters share every step.
//! - [`Mode::MergeSwitch`] (the naive alternative, kept to measure against): one adapter at a
//!   time is merged into the base weights; a step serves only sequences of that adapter, and
//!   switching adapters waits for the running ones to finish, unmerges and merges the next.

use std::path::Path;

use lora::{AdapterBank, LoraModel};
use transformer::Gpt2;

use super::reader::Ready;
use crate::Result;

/// How adapters are served; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Bank,
    MergeSwitch,
}

pub enum Store {
    Bank(AdapterBank),
    MergeSwitch {
        loras: Vec<(String, LoraModel)>,
        /// The adapter merged into the base weights now.
        merged: Option<String>,
    },
}

impl Store {
    /// An empty store for `model` (the bank is attached to it).
    pub fn new(mode: Mode, model: &mut Gpt2) -> Result<Store> {
        Ok(match mode {
            Mode::Bank => {
                let mut bank = AdapterBank::new(model);
                bank.attach(model)?;
                Store::Bank(bank)
            }
            Mode::MergeSwitch => Store::MergeSwitch {
                loras: Vec::new(),
                merged: None,
            },
        })
    }

    /// Adds adapter `name` read from `dir` ([`Reader`](super::reader::Reader)): the bank
    /// writes the ready weights into a slot; the merging server reads them onto the model's
    /// device.
    pub fn insert(&mut self, name: &str, dir: &Path, ready: Ready, model: &Gpt2) -> Result<()> {
        match self {
            Store::Bank(bank) => {
                let host = ready
                    .host
                    .ok_or_else(|| format!("adapter `{name}` was read without its weights"))?;
                bank.insert_host(host)?
            }
            Store::MergeSwitch { loras, .. } => {
                let loaded = LoraModel::load_peft(dir, model)?;
                loras.push((name.to_string(), loaded.lora))
            }
        }
        Ok(())
    }

    /// Bytes the adapters take: the bank's stacks (weights, rank padding, free slots), or the
    /// merging server's adapters.
    pub fn bytes(&self) -> u64 {
        match self {
            Store::Bank(bank) => bank.stack_bytes(),
            Store::MergeSwitch { loras, .. } => loras.iter().map(|(_, l)| l.lora_bytes()).sum(),
        }
    }

    pub fn remove(&mut self, name: &str, model: &Gpt2) -> Result<()> {
        match self {
            Store::Bank(bank) => bank.remove(name)?,
            Store::MergeSwitch { loras, merged } => {
                if merged.as_deref() == Some(name) {
                    switch(loras, merged, None, model)?;
                }
                loras.retain(|(n, _)| n != name);
            }
        }
        Ok(())
    }

    /// Whether a sequence of `adapter` may join a step whose running sequences use `running`.
    pub fn joins(&self, running: &[&Option<String>], adapter: &Option<String>) -> bool {
        match self {
            Store::Bank(_) => true,
            Store::MergeSwitch { .. } => running.iter().all(|r| *r == adapter),
        }
    }

    /// Makes the next step serve row r of the batch by `rows[r]`.
    pub fn route(&mut self, rows: &[Option<&str>], model: &Gpt2) -> Result<()> {
        match self {
            Store::Bank(bank) => bank.route(rows)?,
            Store::MergeSwitch { loras, merged } => {
                let want = rows.first().copied().flatten();
                if rows.iter().any(|r| *r != want) {
                    return Err("a merged-adapter step serves one adapter".into());
                }
                if merged.as_deref() != want {
                    switch(loras, merged, want, model)?;
                }
            }
        }
        Ok(())
    }
}

/// Unmerges the merged adapter (if any) and merges `want` (if any).
fn switch(
    loras: &[(String, LoraModel)],
    merged: &mut Option<String>,
    want: Option<&str>,
    model: &Gpt2,
) -> Result<()> {
    let find = |name: &str| {
        loras
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l)
            .ok_or_else(|| format!("no adapter `{name}` is loaded"))
    };
    if let Some(old) = merged.take() {
        find(&old)?.unmerge(model)?;
    }
    if let Some(new) = want {
        find(new)?.merge(model)?;
        *merged = Some(new.to_string());
    }
    Ok(())
}
