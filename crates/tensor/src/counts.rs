//! Step accounting: what a piece of work asks of the device, counted instead of timed, so it
//! can be measured on any machine (a software GPU, a loaded CI runner) and compared exactly
//! before and after a change.
//!
//! [`start`] turns counting on for the calling thread; [`stop`] returns the [`Counts`] since.
//! Everything is filed under the profiler's phase (forward, backward, optimizer …) and the
//! outermost scope family open at the time (`attention`, `matmul` …; see
//! [`profile`]), which counting tracks like profiling does:
//!
//! - **ops**: every innermost profiler scope closed, by its family: one public op call on
//!   either backend (the CPU's "dispatches");
//! - **dispatches** (GPU): every `dispatch_workgroups` recorded, by kernel (`shader::entry`),
//!   with the workgroups and invocations launched, the bytes of the storage ranges bound and
//!   of those the WGSL declares `read_write` (an upper bound of what the kernel writes: the
//!   ranges a kernel may touch, not the bytes it does), and the host time spent recording it
//!   (pipeline lookup, bind group, encoding);
//! - **copies** (GPU): buffer-to-buffer copies recorded, with their bytes;
//! - **uploads**: host-to-device writes, with their bytes;
//! - **submissions**: command batches handed to the queue;
//! - **waits**: every place the host blocks until the device is done: a readback (`to_vec`:
//!   the loss, a norm) or a [`Device::sync`](crate::Device::sync), with the bytes read;
//! - **matmuls**: every product by its shape (batch, M, N, K and the transpose flags, after
//!   [`matmul`](crate::ops::matmul)'s folding of a shared B), with its FLOPs `2·batch·M·N·K`,
//!   so masked or redundant work (a causal product computed whole) shows by shape;
//! - **memory by phase**: the device's live tensor bytes when each phase made its first
//!   allocation, and the most live bytes during the phase (the counters of
//!   [`memory`](mod@crate::memory), which every allocation of either backend updates). The bytes
//!   the forward leaves for the backward are the saved activations, exactly; and the most
//!   bytes the device held at once counting the GPU pool's cached buffers (`held_peak`: what
//!   the driver had allocated, which a tensor's peak alone understates).
//!
//! Off, each hook costs one relaxed atomic load. Only the thread that called [`start`] is
//! counted, as with the profiler; counting and profiling can run together.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::profile;

static ENABLED: AtomicBool = AtomicBool::new(false);
static STATE: Mutex<State> = Mutex::new(State::new());

thread_local! {
    /// Set on the thread that called [`start`], until [`stop`].
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

/// Where a count belongs: the profiler's phase and outermost family at the time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Context {
    pub phase: &'static str,
    pub scope: &'static str,
}

/// Calls of one op family (innermost scopes).
#[derive(Clone, Debug, PartialEq)]
pub struct OpCount {
    pub at: Context,
    pub family: &'static str,
    pub calls: u64,
}

/// Dispatches of one kernel.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DispatchCount {
    pub at: Context,
    /// `shader::entry`.
    pub kernel: String,
    pub calls: u64,
    pub workgroups: u64,
    /// Workgroups times the entry point's workgroup size.
    pub invocations: u64,
    /// Bytes of the storage ranges bound (the uniform params excluded).
    pub bytes_bound: u64,
    /// Bytes of the bound ranges the WGSL declares `read_write`.
    pub bytes_writable: u64,
    /// Host nanoseconds spent recording these dispatches.
    pub host_ns: u64,
}

/// Calls and bytes of one kind of transfer or wait.
#[derive(Clone, Debug, PartialEq)]
pub struct TransferCount {
    pub at: Context,
    /// `readback`, `sync`, `upload`, `copy`.
    pub what: &'static str,
    pub calls: u64,
    pub bytes: u64,
}

/// Products of one shape.
#[derive(Clone, Debug, PartialEq)]
pub struct MatmulCount {
    pub at: Context,
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub calls: u64,
    /// `2·batch·M·N·K` per call, summed.
    pub flops: u64,
}

/// Live tensor bytes of the device during one phase.
#[derive(Clone, Debug, PartialEq)]
pub struct PhaseMemory {
    pub phase: &'static str,
    /// Live bytes just before the phase's first allocation.
    pub live_at_start: u64,
    /// The most live bytes after any allocation of the phase.
    pub peak: u64,
}

/// What [`stop`] returns; each list is sorted by context then name, `memory` by first use.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub ops: Vec<OpCount>,
    pub dispatches: Vec<DispatchCount>,
    /// Buffer copies (`copy`) and host writes (`upload`).
    pub transfers: Vec<TransferCount>,
    /// Blocking host waits: `readback` and `sync`.
    pub waits: Vec<TransferCount>,
    pub matmuls: Vec<MatmulCount>,
    pub submissions: u64,
    pub memory: Vec<PhaseMemory>,
    /// The most bytes of live tensors plus pooled buffers seen at once.
    pub held_peak: u64,
}

impl Counts {
    /// Ops over every context.
    pub fn op_calls(&self) -> u64 {
        self.ops.iter().map(|o| o.calls).sum()
    }
    /// GPU dispatches over every kernel.
    pub fn dispatch_calls(&self) -> u64 {
        self.dispatches.iter().map(|d| d.calls).sum()
    }
    /// Blocking waits of every kind.
    pub fn wait_calls(&self) -> u64 {
        self.waits.iter().map(|w| w.calls).sum()
    }
    /// Bytes bound by every dispatch.
    pub fn bytes_bound(&self) -> u64 {
        self.dispatches.iter().map(|d| d.bytes_bound).sum()
    }
    /// Writable bytes bound by every dispatch.
    pub fn bytes_writable(&self) -> u64 {
        self.dispatches.iter().map(|d| d.bytes_writable).sum()
    }
    /// FLOPs of every product.
    pub fn matmul_flops(&self) -> u64 {
        self.matmuls.iter().map(|m| m.flops).sum()
    }
    /// Host nanoseconds spent recording dispatches.
    pub fn dispatch_host_ns(&self) -> u64 {
        self.dispatches.iter().map(|d| d.host_ns).sum()
    }
    /// Transfers of kind `what` (`copy`, `upload`): (calls, bytes).
    pub fn transfer(&self, what: &str) -> (u64, u64) {
        self.transfers
            .iter()
            .filter(|t| t.what == what)
            .fold((0, 0), |(c, b), t| (c + t.calls, b + t.bytes))
    }
}

type MatmulKey = (Context, usize, usize, usize, usize, bool, bool);

struct State {
    ops: BTreeMap<(Context, &'static str), u64>,
    dispatches: BTreeMap<(Context, &'static str, &'static str), DispatchCount>,
    transfers: BTreeMap<(Context, &'static str), (u64, u64)>,
    waits: BTreeMap<(Context, &'static str), (u64, u64)>,
    matmuls: BTreeMap<MatmulKey, (u64, u64)>,
    submissions: u64,
    memory: Vec<PhaseMemory>,
    held_peak: u64,
    /// Per shader: the bindings declared `read_write`, and each entry point's workgroup size.
    shaders: Option<HashMap<&'static str, ShaderFacts>>,
}

impl State {
    const fn new() -> State {
        State {
            ops: BTreeMap::new(),
            dispatches: BTreeMap::new(),
            transfers: BTreeMap::new(),
            waits: BTreeMap::new(),
            matmuls: BTreeMap::new(),
            submissions: 0,
            memory: Vec::new(),
            held_peak: 0,
            shaders: None,
        }
    }
}

/// What counting needs to know of a shader, read from its WGSL by naga once.
#[derive(Default)]
struct ShaderFacts {
    writable: Vec<u32>,
    workgroup_size: HashMap<String, u64>,
}

impl ShaderFacts {
    fn of(source: &str) -> ShaderFacts {
        // The engine's own shaders parse (a test checks it); an unparsable one counts as
        // all-read-only with workgroups of 1, which the invocation count then shows.
        let Ok(module) = naga::front::wgsl::parse_str(source) else {
            return ShaderFacts::default();
        };
        let writable = module
            .global_variables
            .iter()
            .filter_map(|(_, g)| match (g.space, g.binding.as_ref()) {
                (naga::AddressSpace::Storage { access }, Some(b))
                    if access.contains(naga::StorageAccess::STORE) =>
                {
                    Some(b.binding)
                }
                _ => None,
            })
            .collect();
        let workgroup_size = module
            .entry_points
            .iter()
            .map(|e| {
                let [x, y, z] = e.workgroup_size;
                (e.name.clone(), x as u64 * y as u64 * z as u64)
            })
            .collect();
        ShaderFacts {
            writable,
            workgroup_size,
        }
    }
}

/// Is this thread being counted? (One relaxed load when counting is off.)
#[inline]
pub fn here() -> bool {
    ENABLED.load(Ordering::Relaxed) && COUNTING.with(Cell::get)
}

/// Clear the counts and count this thread's work from now on.
pub fn start() {
    {
        let mut s = STATE.lock().unwrap_or_else(|p| p.into_inner());
        // Read the registered shaders now, not at their first counted dispatch (where it would
        // add to the time of the work counted).
        let shaders = s.shaders.take().unwrap_or_else(|| {
            crate::shaders::ALL
                .iter()
                .map(|&(name, source)| (name, ShaderFacts::of(source)))
                .collect()
        });
        *s = State::new();
        s.shaders = Some(shaders);
    }
    COUNTING.with(|c| c.set(true));
    ENABLED.store(true, Ordering::Relaxed);
}

/// Stop counting and return what was counted since [`start`].
pub fn stop() -> Counts {
    ENABLED.store(false, Ordering::Relaxed);
    COUNTING.with(|c| c.set(false));
    let s = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let rows = |m: &BTreeMap<(Context, &'static str), (u64, u64)>| {
        m.iter()
            .map(|(&(at, what), &(calls, bytes))| TransferCount {
                at,
                what,
                calls,
                bytes,
            })
            .collect()
    };
    Counts {
        ops: s
            .ops
            .iter()
            .map(|(&(at, family), &calls)| OpCount { at, family, calls })
            .collect(),
        dispatches: s.dispatches.values().cloned().collect(),
        transfers: rows(&s.transfers),
        waits: rows(&s.waits),
        matmuls: s
            .matmuls
            .iter()
            .map(
                |(&(at, batch, m, n, k, trans_a, trans_b), &(calls, flops))| MatmulCount {
                    at,
                    batch,
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    calls,
                    flops,
                },
            )
            .collect(),
        submissions: s.submissions,
        memory: s.memory.clone(),
        held_peak: s.held_peak,
    }
}

fn context() -> Context {
    let (phase, scope) = profile::context();
    Context { phase, scope }
}

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// One innermost scope of `family` closed (called by the profiler's scope guard).
pub(crate) fn op(family: &'static str) {
    if !here() {
        return;
    }
    let at = context();
    *state().ops.entry((at, family)).or_default() += 1;
}

/// One dispatch recorded: of `entry` in `shader` (whose WGSL is `source`), `groups`
/// workgroups, each bound storage range as (binding number, bytes), `host_ns` to record.
pub(crate) fn dispatch(
    shader: &'static str,
    source: &'static str,
    entry: &'static str,
    groups: [u32; 3],
    bound: &[(u32, u64)],
    host_ns: u64,
) {
    if !here() {
        return;
    }
    let at = context();
    let mut s = state();
    let facts = s
        .shaders
        .get_or_insert_with(HashMap::new)
        .entry(shader)
        .or_insert_with(|| ShaderFacts::of(source));
    let workgroups = groups.iter().map(|&g| g as u64).product::<u64>();
    let size = facts.workgroup_size.get(entry).copied().unwrap_or(1);
    let writable: u64 = bound
        .iter()
        .filter(|(b, _)| facts.writable.contains(b))
        .map(|&(_, bytes)| bytes)
        .sum();
    let d = s
        .dispatches
        .entry((at, shader, entry))
        .or_insert_with(|| DispatchCount {
            at,
            kernel: format!("{shader}::{entry}"),
            ..Default::default()
        });
    d.calls += 1;
    d.workgroups += workgroups;
    d.invocations += workgroups * size;
    d.bytes_bound += bound.iter().map(|&(_, bytes)| bytes).sum::<u64>();
    d.bytes_writable += writable;
    d.host_ns += host_ns;
}

/// A transfer of `bytes`: `copy` (buffer to buffer on the device) or `upload` (host to device).
pub(crate) fn transfer(what: &'static str, bytes: u64) {
    if !here() {
        return;
    }
    let at = context();
    let mut s = state();
    let t = s.transfers.entry((at, what)).or_default();
    t.0 += 1;
    t.1 += bytes;
}

/// A blocking host wait: `readback` (of `bytes`) or `sync`.
pub(crate) fn wait(what: &'static str, bytes: u64) {
    if !here() {
        return;
    }
    let at = context();
    let mut s = state();
    let w = s.waits.entry((at, what)).or_default();
    w.0 += 1;
    w.1 += bytes;
}

/// A command batch handed to the queue.
pub(crate) fn submission() {
    if !here() {
        return;
    }
    state().submissions += 1;
}

/// A product `op(A)·op(B)` of `batch` entries of M×K by K×N (the flags as in
/// [`MatmulOpts`](crate::ops::matmul::MatmulOpts)).
pub(crate) fn matmul(batch: usize, m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool) {
    product(
        batch,
        m,
        n,
        k,
        trans_a,
        trans_b,
        2 * (batch * m * n * k) as u64,
    );
}

/// A product of shape `batch × (m×n×k)` that does `flops` floating-point operations: fewer than
/// 2·batch·m·n·k when it skips work (the fused causal attention skips the masked half).
pub(crate) fn product(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    flops: u64,
) {
    if !here() {
        return;
    }
    let at = context();
    let mut s = state();
    let e = s
        .matmuls
        .entry((at, batch, m, n, k, trans_a, trans_b))
        .or_default();
    e.0 += 1;
    e.1 += flops;
}

/// The device holds `bytes` (live tensors and pooled buffers) now.
pub(crate) fn held(bytes: u64) {
    if !here() {
        return;
    }
    let mut s = state();
    s.held_peak = s.held_peak.max(bytes);
}

/// An allocation took the live bytes of its device from `before` to `after`, with `pooled`
/// bytes cached besides.
pub(crate) fn allocated(before: u64, after: u64, pooled: u64) {
    if !here() {
        return;
    }
    let (phase, _) = profile::context();
    let mut s = state();
    s.held_peak = s.held_peak.max(after + pooled);
    match s.memory.iter_mut().find(|m| m.phase == phase) {
        Some(m) => m.peak = m.peak.max(after),
        None => s.memory.push(PhaseMemory {
            phase,
            live_at_start: before,
            peak: after,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::ShaderFacts;

    /// Every registered shader parses for counting (the fallback of an unparsable one, all
    /// read-only with workgroups of 1, is never what the engine's kernels get), writes
    /// somewhere, and each entry point has its workgroup size.
    #[test]
    fn every_registered_shader_has_writable_bindings_and_workgroup_sizes() {
        for (name, source) in crate::shaders::ALL {
            let facts = ShaderFacts::of(source);
            assert!(!facts.writable.is_empty(), "{name}: no read_write binding");
            assert!(!facts.workgroup_size.is_empty(), "{name}: no entry point");
            for (entry, size) in &facts.workgroup_size {
                assert!(*size > 1, "{name}::{entry}: workgroup size {size}");
            }
        }
        let matmul = ShaderFacts::of(crate::shaders::MATMUL);
        assert_eq!(
            matmul.writable,
            [3, 5],
            "matmul.wgsl writes c at binding 3, and gelu_out (its GELU epilogue's g) at 5 only"
        );
        assert_eq!(matmul.workgroup_size["matmul"], 16 * 16);
    }
}
