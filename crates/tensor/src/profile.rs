//! Where the time of a training step goes, by op family: a tiny scoped profiler.
//!
//! Every public op opens a guard on entry, `let _p = profile::scope("matmul");`, and callers
//! higher up may open wider ones (the transformer opens `attention` around q·kᵀ, softmax and
//! att·v; the optimizer opens `optimizer`). Time is attributed to the **outermost** open scope:
//! the softmax inside `attention` counts as attention, not as softmax, so the families add up to
//! the step without double counting. A [`phase`] guard (forward, backward, optimizer …) splits
//! the totals once more.
//!
//! The profiler is off by default and then costs one relaxed atomic load per scope. [`start`]
//! turns it on for one device and picks how time is measured:
//!
//! - [`Method::Wall`] on the CPU: ops run synchronously, so the wall time of the outermost scope
//!   is the time of its ops;
//! - [`Method::GpuTimestamps`] on a GPU whose adapter offers `Features::TIMESTAMP_QUERY`: the GPU
//!   backend starts a new compute pass whenever the family of the recorded dispatches changes
//!   and asks the pass to write a timestamp at its beginning and end; the timestamps are
//!   resolved at each submission and their differences are added to the pass's family. Host
//!   code between dispatches is not counted: this is time on the GPU;
//! - [`Method::HostSync`] on a GPU without timestamp queries (the fallback): the device is
//!   synchronised when an outermost scope opens and when it closes, and the host's wall time in
//!   between is the family's. Waiting for the GPU at every scope removes the overlap of host and
//!   device work, so the step gets slower, but each family's share is measured honestly.
//!
//! Only the thread that called [`start`] is profiled: its scope stack is thread-local, and ops
//! that other threads run meanwhile (other tests, other work of the program) are not counted.
//!
//! The step accounting of [`counts`](crate::counts) uses the same scopes and phases (without
//! timing anything): while it counts on a thread, the scopes of that thread are tracked as
//! when profiling, each innermost scope is counted as one op of its family, and what the GPU
//! backend records is filed under the phase and outermost family open at the time.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;

use crate::Device;

/// How the profiler measures time; see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Host wall time per outermost scope (the CPU backend: ops are synchronous).
    Wall,
    /// GPU timestamps written at the start and end of one compute pass per family change.
    GpuTimestamps,
    /// The fallback for GPUs without timestamp queries: synchronise at each outermost scope's
    /// ends and time on the host.
    HostSync,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Wall => "cpu wall time per scope",
            Method::GpuTimestamps => "gpu timestamp queries per compute pass",
            Method::HostSync => "host time with a device sync at each scope (no timestamp queries)",
        }
    }

    fn code(self) -> u8 {
        match self {
            Method::Wall => 0,
            Method::GpuTimestamps => 1,
            Method::HostSync => 2,
        }
    }

    fn from_code(c: u8) -> Method {
        match c {
            1 => Method::GpuTimestamps,
            2 => Method::HostSync,
            _ => Method::Wall,
        }
    }
}

/// One row of a profile: the time and the number of outermost scopes of a family in a phase.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub phase: &'static str,
    pub family: &'static str,
    pub seconds: f64,
    /// Outermost scopes closed (on the GPU with timestamps: compute passes measured).
    pub calls: u64,
}

/// What [`stop`] returns: how time was measured and the totals, by phase then family.
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub method: Method,
    pub entries: Vec<Entry>,
}

impl Profile {
    /// Total seconds over every phase and family.
    pub fn total(&self) -> f64 {
        self.entries.iter().map(|e| e.seconds).sum()
    }

    /// Seconds of `family` summed over the phases.
    pub fn family(&self, family: &str) -> f64 {
        self.entries
            .iter()
            .filter(|e| e.family == family)
            .map(|e| e.seconds)
            .sum()
    }
}

/// The phase of work outside any [`phase`] guard.
pub const NO_PHASE: &str = "-";
/// The family of GPU work recorded outside any scope (fills, uploads' kernels).
pub const OTHER: &str = "other";

static ENABLED: AtomicBool = AtomicBool::new(false);
static METHOD: AtomicU8 = AtomicU8::new(0);
/// Seconds and outermost scopes by (phase, family).
type Totals = BTreeMap<(&'static str, &'static str), (f64, u64)>;
static TOTALS: Mutex<Totals> = Mutex::new(BTreeMap::new());
/// The device the fallback method synchronises.
static SYNC_DEVICE: Mutex<Option<Device>> = Mutex::new(None);

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static OUTER: Cell<Option<(&'static str, Instant)>> = const { Cell::new(None) };
    static PHASE: Cell<&'static str> = const { Cell::new(NO_PHASE) };
    /// Set on the thread that called [`start`], until [`stop`].
    static PROFILED: Cell<bool> = const { Cell::new(false) };
    /// No scope was opened inside the innermost open one (yet): it is a leaf, one op.
    static LEAF: Cell<bool> = const { Cell::new(false) };
}

/// Is the profiler on? (One relaxed load: what a disabled scope costs.)
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Is this thread's work being profiled? (The profiler is on and this thread started it.)
#[inline]
fn profiling() -> bool {
    enabled() && PROFILED.with(Cell::get)
}

/// Are this thread's scopes tracked: profiled, or counted by [`counts`](crate::counts)?
#[inline]
fn here() -> bool {
    profiling() || crate::counts::here()
}

fn method() -> Method {
    Method::from_code(METHOD.load(Ordering::Relaxed))
}

/// Clear the totals and start profiling the ops of `device`; returns the method chosen for it.
pub fn start(device: &Device) -> Method {
    let m = match device {
        Device::Cpu(_) => Method::Wall,
        Device::Gpu(g) if g.has_timestamps() => Method::GpuTimestamps,
        Device::Gpu(_) => Method::HostSync,
    };
    start_with(device, m)
}

/// [`start`] with a chosen method (GpuTimestamps falls back to HostSync where the adapter has no
/// timestamp queries). Tests use it to exercise the fallback on any adapter.
pub fn start_with(device: &Device, method: Method) -> Method {
    let method = match (device, method) {
        (Device::Cpu(_), _) => Method::Wall,
        (Device::Gpu(g), Method::GpuTimestamps) if !g.has_timestamps() => Method::HostSync,
        (Device::Gpu(_), Method::Wall) => Method::HostSync,
        (_, m) => m,
    };
    let _ = device.sync();
    TOTALS.lock().unwrap().clear();
    *SYNC_DEVICE.lock().unwrap() = Some(device.clone());
    METHOD.store(method.code(), Ordering::Relaxed);
    PROFILED.with(|p| p.set(true));
    ENABLED.store(true, Ordering::Relaxed);
    method
}

/// Stop profiling and return the totals since [`start`]. Pending GPU work is finished first, so
/// its timestamps are counted.
pub fn stop() -> Profile {
    let device = SYNC_DEVICE.lock().unwrap().take();
    if let Some(d) = &device {
        let _ = d.sync();
    }
    ENABLED.store(false, Ordering::Relaxed);
    PROFILED.with(|p| p.set(false));
    let entries = TOTALS
        .lock()
        .unwrap()
        .iter()
        .map(|(&(phase, family), &(seconds, calls))| Entry {
            phase,
            family,
            seconds,
            calls,
        })
        .collect();
    Profile {
        method: method(),
        entries,
    }
}

fn add(phase: &'static str, family: &'static str, seconds: f64, calls: u64) {
    let mut totals = TOTALS.lock().unwrap();
    let slot = totals.entry((phase, family)).or_insert((0.0, 0));
    slot.0 += seconds;
    slot.1 += calls;
}

fn sync_device() {
    let device = SYNC_DEVICE.lock().unwrap().clone();
    if let Some(d) = device {
        let _ = d.sync();
    }
}

/// A scope guard; time is attributed when the outermost one is dropped.
#[must_use = "a scope measures until it is dropped"]
pub struct Scope {
    active: bool,
    family: &'static str,
}

/// Open a scope of `family` (see the module doc); near-free when the profiler is off.
#[inline]
pub fn scope(family: &'static str) -> Scope {
    if !here() {
        return Scope {
            active: false,
            family,
        };
    }
    open(family)
}

#[cold]
fn open(family: &'static str) -> Scope {
    let depth = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get()
    });
    if depth == 1 {
        if profiling() && method() == Method::HostSync {
            sync_device();
        }
        OUTER.with(|o| o.set(Some((family, Instant::now()))));
    }
    LEAF.with(|l| l.set(true));
    Scope {
        active: true,
        family,
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        if LEAF.with(|l| l.replace(false)) && crate::counts::here() {
            crate::counts::op(self.family);
        }
        let depth = DEPTH.with(|d| {
            d.set(d.get().saturating_sub(1));
            d.get()
        });
        if depth > 0 {
            return;
        }
        let Some((family, start)) = OUTER.with(|o| o.take()) else {
            return;
        };
        if !profiling() {
            return;
        }
        let phase = PHASE.with(Cell::get);
        match method() {
            // The GPU's timestamps carry the time; count the scope only.
            Method::GpuTimestamps => add(phase, family, 0.0, 1),
            Method::HostSync => {
                sync_device();
                add(phase, family, start.elapsed().as_secs_f64(), 1);
            }
            Method::Wall => add(phase, family, start.elapsed().as_secs_f64(), 1),
        }
    }
}

/// The family of the outermost open scope of this thread, when profiling (else `None`). The
/// tape stores it with each node so that an op's backward is attributed like its forward.
pub fn current_family() -> Option<&'static str> {
    if !here() {
        return None;
    }
    OUTER.with(|o| o.get()).map(|(f, _)| f)
}

/// A phase guard: until dropped, totals of this thread go under `name`.
#[must_use = "a phase lasts until it is dropped"]
pub struct Phase {
    previous: Option<&'static str>,
}

/// Enter phase `name` (forward, backward, optimizer …); near-free when the profiler is off.
#[inline]
pub fn phase(name: &'static str) -> Phase {
    if !here() {
        return Phase { previous: None };
    }
    Phase {
        previous: Some(PHASE.with(|p| p.replace(name))),
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        if let Some(prev) = self.previous {
            PHASE.with(|p| p.set(prev));
        }
    }
}

/// The phase and the outermost family open on this thread now ([`NO_PHASE`] and [`OTHER`]
/// outside any), while its scopes are tracked.
pub(crate) fn context() -> (&'static str, &'static str) {
    let family = OUTER.with(|o| o.get()).map_or(OTHER, |(f, _)| f);
    (PHASE.with(Cell::get), family)
}

/// The (phase, family) a GPU dispatch recorded now belongs to, when timestamps are being taken.
pub(crate) fn gpu_tag() -> Option<(&'static str, &'static str)> {
    if !profiling() || method() != Method::GpuTimestamps {
        return None;
    }
    let family = OUTER.with(|o| o.get()).map_or(OTHER, |(f, _)| f);
    Some((PHASE.with(Cell::get), family))
}

/// Add GPU-measured time of one compute pass.
pub(crate) fn add_gpu_time(tag: (&'static str, &'static str), seconds: f64) {
    add(tag.0, tag.1, seconds, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tensor;
    use crate::ops::matmul::{MatmulOpts, matmul};

    /// The profiler is process-global: tests that turn it on take turns.
    pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

    fn busy(ms: u64) {
        let t = Instant::now();
        while t.elapsed().as_millis() < ms as u128 {
            std::hint::black_box(0u64);
        }
    }

    #[test]
    fn outermost_scope_takes_the_time_of_nested_ones() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        assert_eq!(start(&Device::cpu()), Method::Wall);
        {
            let _a = scope("attention");
            busy(5);
            let _m = scope("matmul");
            busy(5);
            assert_eq!(current_family(), Some("attention"));
        }
        {
            let _p = phase("backward");
            let _m = scope("matmul");
            busy(3);
        }
        let p = stop();
        assert_eq!(p.method, Method::Wall);
        let names: Vec<_> = p.entries.iter().map(|e| (e.phase, e.family)).collect();
        assert_eq!(names, [("-", "attention"), ("backward", "matmul")]);
        assert!(p.entries[0].seconds >= 0.010, "{p:?}");
        assert_eq!(p.entries[0].calls, 1);
        assert!(p.entries[1].seconds >= 0.003, "{p:?}");
        assert_eq!(p.family("matmul"), p.entries[1].seconds);
        assert_eq!(current_family(), None);
    }

    #[test]
    fn disabled_profiler_records_nothing() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        start(&Device::cpu());
        let _ = stop();
        {
            let _a = scope("matmul");
            let _p = phase("forward");
            busy(1);
            assert_eq!(current_family(), None);
        }
        DEPTH.with(|d| assert_eq!(d.get(), 0));
        start(&Device::cpu());
        let p = stop();
        assert!(p.entries.is_empty(), "{p:?}");
    }

    #[test]
    fn ops_are_attributed_to_their_family_on_the_cpu() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = Device::cpu();
        let a = Tensor::full(&[64, 64], 0.5, &cpu).unwrap();
        start(&cpu);
        let c = matmul(&a, &a, None, MatmulOpts::default()).unwrap();
        let _ = crate::ops::elementwise::add(&c, &c).unwrap();
        let p = stop();
        let fams: Vec<_> = p.entries.iter().map(|e| e.family).collect();
        assert_eq!(fams, ["elementwise", "matmul"], "{p:?}");
        assert!(p.entries.iter().all(|e| e.calls == 1 && e.seconds > 0.0));
    }

    /// On the GPU a matmul's family gets non-zero time, with timestamps where the adapter has
    /// them and with the host-sync fallback in any case.
    #[test]
    fn gpu_matmul_family_gets_time_by_both_methods() {
        let Some(gpu) = crate::testing::gpu() else {
            return;
        };
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let a = Tensor::full(&[128, 128], 0.5, &gpu).unwrap();
        for wanted in [Method::GpuTimestamps, Method::HostSync] {
            let method = start_with(&gpu, wanted);
            for _ in 0..3 {
                let _ = matmul(&a, &a, None, MatmulOpts::default()).unwrap();
            }
            let p = stop();
            assert_eq!(p.method, method);
            assert!(p.family("matmul") > 0.0, "{method:?}: {p:?}");
            let calls: u64 = p.entries.iter().map(|e| e.calls).sum();
            assert!(calls >= 3, "{p:?}");
        }
    }
}
