//! Parameters: a weight is either `Frozen` (a plain tensor: no gradient, no optimizer state) or
//! `Trainable` (it has an id under which gradients and optimizer state are kept).
//!
//! The distinction is in the types: the optimizers take only [`Trainable`]s, and [`crate::Grads`]
//! has entries only for them. One model serves full fine-tuning and LoRA: switch a parameter
//! between the two with [`Param::freeze`] and [`Param::unfreeze`] between runs.

use std::sync::atomic::{AtomicU64, Ordering};

use tensor::Tensor;

/// The identity of a trainable parameter: the key of its gradient and optimizer state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(u64);

impl ParamId {
    fn fresh() -> ParamId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ParamId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// A parameter that learns: its value (updated in place by the optimizer) and its id.
#[derive(Clone, Debug)]
pub struct Trainable {
    pub id: ParamId,
    pub name: String,
    pub value: Tensor,
}

/// A model weight, frozen or trainable.
#[derive(Clone, Debug)]
pub enum Param {
    /// Part of the function, not of the search: no gradient buffer, no optimizer state, and
    /// no backward work for its own gradient.
    Frozen { name: String, value: Tensor },
    /// Learns: gradients and optimizer state are kept under its id.
    Trainable(Trainable),
}

impl Param {
    /// A new trainable parameter.
    pub fn trainable(name: impl Into<String>, value: Tensor) -> Param {
        Param::Trainable(Trainable {
            id: ParamId::fresh(),
            name: name.into(),
            value,
        })
    }

    /// A new frozen parameter.
    pub fn frozen(name: impl Into<String>, value: Tensor) -> Param {
        Param::Frozen {
            name: name.into(),
            value,
        }
    }

    pub fn value(&self) -> &Tensor {
        match self {
            Param::Frozen { value, .. } => value,
            Param::Trainable(t) => &t.value,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Param::Frozen { name, .. } => name,
            Param::Trainable(t) => &t.name,
        }
    }

    pub fn is_trainable(&self) -> bool {
        matches!(self, Param::Trainable(_))
    }

    /// The trainable handle, if it is one.
    pub fn as_trainable(&self) -> Option<&Trainable> {
        match self {
            Param::Trainable(t) => Some(t),
            Param::Frozen { .. } => None,
        }
    }

    /// Stop training this parameter (its value stays; a new id is made if it is unfrozen later,
    /// so stale optimizer state can never be applied to it).
    pub fn freeze(&mut self) {
        if let Param::Trainable(t) = self {
            *self = Param::frozen(std::mem::take(&mut t.name), t.value.clone());
        }
    }

    /// Start training this parameter.
    pub fn unfreeze(&mut self) {
        if let Param::Frozen { name, value } = self {
            *self = Param::trainable(std::mem::take(name), value.clone());
        }
    }
}
