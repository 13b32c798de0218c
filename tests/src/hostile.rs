//! Hostile-input fuzzing shared by the loaders' tests (`hostile_files`, `hostile_adapters`,
//! `hostile_state`): proptest strategies that damage a valid file, byte by byte
//! ([`Mutation`]: flip, truncate, insert, delete, forge a safetensors header length) and inside
//! its JSON ([`JsonEdit`]: set, retype or remove a key, edit a safetensors header entry's
//! `dtype` / `shape` / `data_offsets`, replace the whole value), an allocation watch that
//! tells how large the largest single allocation of a load was, and [`fuzz`], the loop that
//! runs a loader on damaged files and checks what it did.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::fmt::Display;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// A guard against large allocations: the largest single request made by this thread.

/// Every allocation goes to the system allocator; the size of the largest one a thread asks
/// for is remembered, so a test can check what a load of hostile input requested. A test
/// binary installs it with `#[global_allocator] static WATCH: Watch = Watch;`; without that,
/// [`watched`] reports 0.
pub struct Watch;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: forwards every call to `System` unchanged; only records sizes in a const-initialised
// thread-local `Cell`, which neither allocates nor can re-enter the allocator.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f`, returning its result and the largest single allocation it made.
pub fn watched<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------------------------
// safetensors files

/// A safetensors file's header as JSON and the data bytes after it.
/// Panics unless `bytes` is a well-formed file: for the valid files the tests start from.
pub fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// A safetensors file made of `header` (serialised, with its true length) and `data`.
pub fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// The number of cases each fuzzer runs: `PROPTEST_CASES`, or 256.
pub fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// One change to a file's bytes.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// XOR the byte at (offset mod length) with a mask.
    Flip(usize, u8),
    /// Keep the first (n mod (length + 1)) bytes.
    Truncate(usize),
    /// Insert bytes at (offset mod (length + 1)).
    Insert(usize, Vec<u8>),
    /// Remove up to n bytes from (offset mod length).
    Delete(usize, usize),
    /// Overwrite the first 8 bytes (a safetensors header's length).
    HeaderLength(u64),
}

pub fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(at, m)| Mutation::Flip(at, m)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        1 => (any::<usize>(), 1..16usize).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => prop_oneof![any::<u64>(), 0..8192u64].prop_map(Mutation::HeaderLength),
    ]
}

pub fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(at, mask) if len > 0 => bytes[at % len] ^= mask,
        Mutation::Truncate(n) => bytes.truncate(n % (len + 1)),
        Mutation::Insert(at, new) => {
            let at = at % (len + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Delete(at, n) if len > 0 => {
            let at = at % len;
            bytes.drain(at..(at + n).min(len));
        }
        Mutation::HeaderLength(n) if len >= 8 => bytes[..8].copy_from_slice(&n.to_le_bytes()),
        _ => {}
    }
}

/// A JSON value to splice in: the kinds a field can be mistyped as, and numbers at the edges.
pub fn json_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (0..70u32).prop_map(|e| json!(1u64.checked_shl(e).unwrap_or(u64::MAX))),
        any::<i64>().prop_map(Value::from),
        (-1e300..1e300f64).prop_map(Value::from),
        "[A-Z0-9_]{0,6}".prop_map(Value::from),
        prop_oneof![
            Just("F32"),
            Just("F16"),
            Just("BF16"),
            Just("F64"),
            Just("I8"),
            Just("U8")
        ]
        .prop_map(Value::from),
        prop::collection::vec(0..300u64, 0..4).prop_map(|v| json!(v)),
        prop::collection::vec(any::<u64>(), 0..4).prop_map(|v| json!(v)),
        Just(json!({})),
    ]
}

/// One edit inside a JSON object: set or remove key number `k` (mod the key count), set a
/// field of the entry under it (safetensors headers nest one level), or replace the root.
#[derive(Clone, Debug)]
pub enum JsonEdit {
    Set(usize, Value),
    SetField(usize, &'static str, Value),
    Remove(usize),
    Root(Value),
}

pub fn json_edit() -> impl Strategy<Value = JsonEdit> {
    let field = prop_oneof![Just("dtype"), Just("shape"), Just("data_offsets")];
    prop_oneof![
        3 => (any::<usize>(), json_value()).prop_map(|(k, v)| JsonEdit::Set(k, v)),
        4 => (any::<usize>(), field, json_value()).prop_map(|(k, f, v)| JsonEdit::SetField(k, f, v)),
        1 => any::<usize>().prop_map(JsonEdit::Remove),
        1 => json_value().prop_map(JsonEdit::Root),
    ]
}

pub fn edit_json(value: &mut Value, edit: &JsonEdit) {
    if let JsonEdit::Root(v) = edit {
        *value = v.clone();
        return;
    }
    let Some(obj) = value.as_object_mut() else {
        return;
    };
    let keys: Vec<String> = obj.keys().cloned().collect();
    let key = |k: usize| keys.get(k % keys.len().max(1)).cloned();
    match edit {
        JsonEdit::Set(k, v) => {
            if let Some(key) = key(*k) {
                obj.insert(key, v.clone());
            }
        }
        JsonEdit::SetField(k, f, v) => {
            if let Some(entry) = key(*k).and_then(|key| obj.get_mut(&key))
                && let Some(entry) = entry.as_object_mut()
            {
                entry.insert(f.to_string(), v.clone());
            }
        }
        JsonEdit::Remove(k) => {
            if let Some(key) = key(*k) {
                obj.remove(&key);
            }
        }
        JsonEdit::Root(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// The fuzz loop

/// Runs [`cases`] cases drawn from `strategy`. Each case first writes its damaged files
/// (`damage`), then loads them (`load`) under the allocation [`Watch`]; the case fails when the
/// load's largest single allocation exceeds `bound` bytes or when it refuses the files with an
/// error that does not start with `prefix` (the file or directory it names). A panic anywhere
/// fails the test. Prints how many cases ran and how many loads succeeded (`what` names them:
/// "model", "adapter" …).
pub fn fuzz<S: Strategy, T, E: Display>(
    what: &str,
    strategy: S,
    bound: usize,
    prefix: &str,
    damage: impl FnMut(S::Value),
    load: impl FnMut() -> Result<T, E>,
) {
    // proptest runs a case through `Fn`; the closures write files and need `FnMut`.
    let (damage, load) = (RefCell::new(damage), RefCell::new(load));
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let (ran, loaded) = (Cell::new(0u32), Cell::new(0u32));
    let result = runner.run(&strategy, |value| {
        ran.set(ran.get() + 1);
        (damage.borrow_mut())(value);
        let (result, largest) = watched(&mut *load.borrow_mut());
        prop_assert!(largest <= bound, "{largest} bytes in one allocation");
        match result {
            Ok(_) => loaded.set(loaded.get() + 1),
            Err(e) => {
                let e = e.to_string();
                prop_assert!(e.starts_with(prefix), "{}", e);
            }
        }
        Ok(())
    });
    let (ran, loaded) = (ran.get(), loaded.get());
    println!("{what} fuzzer: {ran} cases ran ({loaded} loaded, the rest refused)");
    result.unwrap();
    assert!(ran >= cases());
}
