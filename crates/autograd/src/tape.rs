//! The tape: ops append a node as they run forward; `backward` walks the nodes in reverse.
//!
//! Recording order is already a topological order, so backward is one loop: take the node's
//! output gradient, call its backward closure, add what it returns to its inputs' gradients.
//! A node exists only if one of its inputs requires a gradient, so a frozen weight multiplied
//! with an input that needs none leaves no trace at all; each backward closure captures only
//! the tensors its gradients need (matmul keeps x only when W is trainable), and the closure
//! and what it captured are dropped as soon as it has run.
//!
//! Where a value feeds several ops, its gradient is a sum. Ops recorded with
//! [`Tape::record_accumulating`] are offered the sum so far ([`Pending::take`]) and add their
//! own share into it in place (a matrix product's accumulating mode, layer norm's), so the
//! residual stream and a LoRA input cost no separate addition kernel; for every other op the
//! tape adds the two tensors.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

use tensor::ops::elementwise::add;
use tensor::{Result, Tensor};

use crate::grads::Grads;
use crate::memory::Counter;
use crate::param::{Param, ParamId};

/// A value in the graph: its tensor, and whether a gradient must flow to it.
#[derive(Clone, Debug)]
pub struct Var {
    pub(crate) id: usize,
    pub value: Tensor,
    pub requires_grad: bool,
}

impl Var {
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
}

/// Bytes of the tensors a backward closure keeps (`None`s, for tensors not kept, count 0).
pub fn bytes_of<'a>(saved: impl IntoIterator<Item = Option<&'a Tensor>>) -> u64 {
    saved.into_iter().flatten().map(Tensor::bytes).sum()
}

/// The gradients a backward closure returns, one per input (None where none is needed).
pub type InputGrads = Vec<Option<Tensor>>;

type BackwardFn = Box<dyn FnOnce(&Tensor, &mut Pending) -> Result<InputGrads>>;

/// The gradients already summed for a node's inputs while its backward rule runs (the rule's
/// own share is still to be added). See [`Pending::take`].
pub struct Pending<'a> {
    sums: &'a mut HashMap<usize, Tensor>,
    inputs: &'a [usize],
    taken: Vec<bool>,
}

impl Pending<'_> {
    /// Input `i`'s gradient summed so far, handed over to the rule when nothing else holds its
    /// storage (so writing into it is unobservable). The rule must add its own gradient for
    /// input `i` into the tensor and return that tensor as input `i`'s gradient; the tape then
    /// stores it without an addition. `None` when there is no sum yet, or it is shared: the
    /// rule returns a fresh gradient as usual.
    pub fn take(&mut self, i: usize) -> Option<Tensor> {
        let id = *self.inputs.get(i)?;
        if self.taken[i] || !self.sums.get(&id)?.is_exclusive() {
            return None;
        }
        self.taken[i] = true;
        self.sums.remove(&id)
    }
}

struct Node {
    op: &'static str,
    output: usize,
    inputs: Vec<usize>,
    saved_bytes: u64,
    backward: BackwardFn,
    /// The profiler's family open when the op ran forward, so backward is attributed alike.
    family: Option<&'static str>,
}

#[derive(Default)]
struct Inner {
    nodes: Vec<Node>,
    next_id: usize,
    leaves: HashMap<usize, ParamId>,
    saved: Counter,
    matmuls_in_backward: Rc<Cell<u64>>,
}

/// Counts from one backward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackwardStats {
    /// Nodes whose backward ran.
    pub nodes: usize,
    /// Matrix products launched by backward rules.
    pub matmuls: u64,
}

/// Records ops for reverse-mode differentiation. [`Tape::inference`] records nothing.
pub struct Tape {
    inner: RefCell<Inner>,
    recording: bool,
    /// Activations saved in f16 ([`crate::saved`]).
    pub(crate) half_activations: Cell<bool>,
}

impl Default for Tape {
    fn default() -> Self {
        Tape::new()
    }
}

impl Tape {
    /// A tape that records.
    pub fn new() -> Tape {
        Tape {
            inner: RefCell::default(),
            recording: true,
            half_activations: Cell::new(false),
        }
    }

    /// A tape for inference: ops compute values and keep nothing.
    pub fn inference() -> Tape {
        Tape {
            inner: RefCell::default(),
            recording: false,
            half_activations: Cell::new(false),
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
    }

    fn fresh_id(&self) -> usize {
        let mut inner = self.inner.borrow_mut();
        inner.next_id += 1;
        inner.next_id
    }

    /// A value that needs no gradient (an input, a target, a mask).
    pub fn constant(&self, value: Tensor) -> Var {
        Var {
            id: self.fresh_id(),
            value,
            requires_grad: false,
        }
    }

    /// A parameter as a leaf of the graph: trainable ones collect gradients into [`Grads`]
    /// under their id; frozen ones are constants.
    pub fn param(&self, p: &Param) -> Var {
        let var = Var {
            id: self.fresh_id(),
            value: p.value().clone(),
            requires_grad: self.recording && p.is_trainable(),
        };
        if let Param::Trainable(t) = p
            && self.recording
        {
            self.inner.borrow_mut().leaves.insert(var.id, t.id);
        }
        var
    }

    /// Record an op that produced `value` from `inputs`. `saved` is the bytes of the tensors
    /// `backward` captured (see [`bytes_of`]), for the memory count. When no input requires a gradient, nothing is recorded and the
    /// closure (with its captures) is dropped at once.
    pub fn record(
        &self,
        op: &'static str,
        value: Tensor,
        inputs: &[&Var],
        saved: u64,
        backward: impl FnOnce(&Tensor) -> Result<InputGrads> + 'static,
    ) -> Result<Var> {
        self.record_accumulating(op, value, inputs, saved, move |d, _| backward(d))
    }

    /// [`Tape::record`] for an op whose backward rule can add its gradients into the sums
    /// already pending for its inputs ([`Pending::take`]) instead of returning fresh tensors.
    pub fn record_accumulating(
        &self,
        op: &'static str,
        value: Tensor,
        inputs: &[&Var],
        saved: u64,
        backward: impl FnOnce(&Tensor, &mut Pending) -> Result<InputGrads> + 'static,
    ) -> Result<Var> {
        let requires_grad = self.recording && inputs.iter().any(|v| v.requires_grad);
        let id = self.fresh_id();
        if requires_grad {
            let saved_bytes = saved;
            let mut inner = self.inner.borrow_mut();
            inner.saved.add(saved_bytes);
            inner.nodes.push(Node {
                op,
                output: id,
                inputs: inputs.iter().map(|v| v.id).collect(),
                saved_bytes,
                backward: Box::new(backward),
                family: tensor::profile::current_family(),
            });
        }
        Ok(Var {
            id,
            value,
            requires_grad,
        })
    }

    /// A counter that backward rules bump for each matmul they launch.
    pub(crate) fn matmul_counter(&self) -> Rc<Cell<u64>> {
        self.inner.borrow().matmuls_in_backward.clone()
    }

    /// Bytes of tensors the tape holds for backward (live now, and the peak).
    pub fn saved_memory(&self) -> Counter {
        self.inner.borrow().saved
    }

    /// Number of recorded nodes.
    pub fn len(&self) -> usize {
        self.inner.borrow().nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the recorded ops, in order (for tests and debugging).
    pub fn ops(&self) -> Vec<&'static str> {
        self.inner.borrow().nodes.iter().map(|n| n.op).collect()
    }

    /// Back-propagate from `loss` (seeded with 1s), accumulating the gradients of trainable
    /// parameters into `grads`. The tape is consumed: every node runs once and is dropped.
    pub fn backward(&self, loss: &Var, grads: &mut Grads) -> Result<BackwardStats> {
        if !loss.requires_grad {
            return Err(tensor::Error::Invalid(
                "backward: the loss does not depend on any trainable parameter".into(),
            ));
        }
        let seed = Tensor::full(loss.value.shape(), 1.0, &loss.value.device())?;
        let (nodes, leaves) = {
            let mut inner = self.inner.borrow_mut();
            (
                std::mem::take(&mut inner.nodes),
                std::mem::take(&mut inner.leaves),
            )
        };
        let mut pending: HashMap<usize, Tensor> = HashMap::from([(loss.id, seed)]);
        let mut stats = BackwardStats::default();
        let counter = self.matmul_counter();
        let matmuls_before = counter.get();
        for node in nodes.into_iter().rev() {
            let saved_bytes = node.saved_bytes;
            if let Some(dout) = pending.remove(&node.output) {
                let _profile = node.family.map(tensor::profile::scope);
                let mut offered = Pending {
                    sums: &mut pending,
                    inputs: &node.inputs,
                    taken: vec![false; node.inputs.len()],
                };
                let input_grads = (node.backward)(&dout, &mut offered)?;
                let taken = offered.taken;
                stats.nodes += 1;
                let mut input_grads = input_grads.into_iter();
                for (k, input) in node.inputs.iter().enumerate() {
                    let g = input_grads.next().flatten();
                    let sum = match (g, taken[k]) {
                        // The rule added its share into the sum it took.
                        (Some(g), true) => g,
                        (None, true) => {
                            return Err(tensor::Error::Invalid(format!(
                                "backward of {}: took input {k}'s gradient and returned none",
                                node.op
                            )));
                        }
                        (None, false) => continue,
                        (Some(g), false) => match pending.remove(input) {
                            Some(prev) => add(&prev, &g)?,
                            None => g,
                        },
                    };
                    pending.insert(*input, sum);
                }
            }
            // The closure and what it captured are gone now.
            self.inner.borrow_mut().saved.sub(saved_bytes);
        }
        // In the order the leaves were made, not the map's: a parameter read twice (GPT-2's
        // tied wte) then adds its two gradients into `grads` in the same order in every run,
        // which makes accumulated micro-batches repeat to the bit.
        let mut leaves: Vec<(usize, ParamId)> = leaves.into_iter().collect();
        leaves.sort_unstable();
        for (var, id) in leaves {
            if let Some(g) = pending.remove(&var) {
                grads.accumulate(id, g)?;
            }
        }
        stats.matmuls = counter.get() - matmuls_before;
        Ok(stats)
    }
}
