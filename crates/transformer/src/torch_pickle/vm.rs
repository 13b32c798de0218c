//! The pickle machine of [`super`]: a stack program interpreter that knows only the opcodes a
//! state dict uses and only the globals of [`super`]'s table, each rebuilt by hand rather than
//! called. Anything else is refused by name.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use super::{Dtype, TensorRef};

/// The deepest stack and the most memo entries a state dict's pickle may use.
const MAX_STACK: usize = 1 << 20;

/// A pickled dict: its (key, value) pairs in insertion order, shared as pickle's memo shares it.
type DictCell = Rc<RefCell<Vec<(Obj, Obj)>>>;

/// The values the machine handles.
#[derive(Clone, Debug)]
pub(super) enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<Obj>),
    List(Rc<RefCell<Vec<Obj>>>),
    Dict(DictCell),
    /// A callable or class we know, by its `module.name`.
    Global(&'static str),
    Storage(Dtype, String, usize),
    Tensor(Box<TensorRef>),
    Mark,
}

const ORDERED_DICT: &str = "collections.OrderedDict";
const REBUILD_TENSOR: &str = "torch._utils._rebuild_tensor_v2";
const REBUILD_PARAMETER: &str = "torch._utils._rebuild_parameter";

/// The known global of `module.name`, or `None`.
fn known_global(module: &str, name: &str) -> Option<&'static str> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => ORDERED_DICT,
        ("torch._utils", "_rebuild_tensor_v2") => REBUILD_TENSOR,
        ("torch._utils", "_rebuild_parameter") => REBUILD_PARAMETER,
        ("torch", "FloatStorage") => "torch.FloatStorage",
        ("torch", "HalfStorage") => "torch.HalfStorage",
        ("torch", "BFloat16Storage") => "torch.BFloat16Storage",
        _ => return None,
    })
}

/// A short description of a value for messages.
pub(super) fn kind(o: &Obj) -> String {
    match o {
        Obj::None => "None".into(),
        Obj::Bool(b) => format!("the bool {b}"),
        Obj::Int(i) => format!("the int {i}"),
        Obj::Float(f) => format!("the float {f}"),
        Obj::Str(s) => format!("the string {s:?}"),
        Obj::Tuple(t) => format!("a tuple of {}", t.len()),
        Obj::List(_) => "a list".into(),
        Obj::Dict(_) => "a dict".into(),
        Obj::Global(g) => format!("the global `{g}`"),
        Obj::Storage(..) => "a storage".into(),
        Obj::Tensor(_) => "a tensor".into(),
        Obj::Mark => "a mark".into(),
    }
}

/// The pickle machine: a stack, the marks, a memo.
#[derive(Default)]
pub(super) struct Machine {
    stack: Vec<Obj>,
    memo: HashMap<u32, Obj>,
}

pub(super) type R<T> = std::result::Result<T, String>;

/// Reads the pickle byte by byte.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("truncated at byte {}", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> R<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> R<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn line(&mut self) -> R<String> {
        let rest = &self.bytes[self.at..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated GLOBAL")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "GLOBAL name is not UTF-8")?;
        self.at += n + 1;
        Ok(s.to_string())
    }
    fn string(&mut self, n: usize) -> R<String> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
}

impl Machine {
    fn push(&mut self, o: Obj) -> R<()> {
        if self.stack.len() >= MAX_STACK {
            return Err("the pickle's stack grows past what a state dict needs".into());
        }
        self.stack.push(o);
        Ok(())
    }

    fn pop(&mut self) -> R<Obj> {
        self.stack
            .pop()
            .ok_or_else(|| "stack underflow".to_string())
    }

    /// Everything above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> R<Vec<Obj>> {
        let at = self
            .stack
            .iter()
            .rposition(|o| matches!(o, Obj::Mark))
            .ok_or("no MARK on the stack")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, key: u32) -> R<()> {
        if self.memo.len() >= MAX_STACK {
            return Err("the pickle's memo grows past what a state dict needs".into());
        }
        let top = self.stack.last().ok_or("memo of an empty stack")?.clone();
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> R<()> {
        let o = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo {key} is empty"))?
            .clone();
        self.push(o)
    }

    pub(super) fn run(mut self, bytes: &[u8]) -> R<Obj> {
        let mut r = Reader { bytes, at: 0 };
        loop {
            let at = r.at;
            let op = r.u8()?;
            match op {
                0x80 => {
                    let proto = r.u8()?;
                    if proto > 5 {
                        return Err(format!("pickle protocol {proto} is unknown"));
                    }
                }
                0x95 => {
                    r.take(8)?; // FRAME: a length hint
                }
                b'c' => {
                    let (module, name) = (r.line()?, r.line()?);
                    self.global(&module, &name)?;
                }
                0x93 => {
                    // STACK_GLOBAL
                    let (name, module) = (self.pop()?, self.pop()?);
                    match (module, name) {
                        (Obj::Str(m), Obj::Str(n)) => self.global(&m, &n)?,
                        _ => return Err("STACK_GLOBAL without two names".into()),
                    }
                }
                b'}' => self.push(Obj::Dict(Rc::default()))?,
                b']' => self.push(Obj::List(Rc::default()))?,
                b')' => self.push(Obj::Tuple(Vec::new()))?,
                b'(' => self.push(Obj::Mark)?,
                b'N' => self.push(Obj::None)?,
                0x88 => self.push(Obj::Bool(true))?,
                0x89 => self.push(Obj::Bool(false))?,
                b'X' => {
                    let n = r.u32()? as usize;
                    let s = r.string(n)?;
                    self.push(Obj::Str(s))?;
                }
                0x8c => {
                    let n = r.u8()? as usize;
                    let s = r.string(n)?;
                    self.push(Obj::Str(s))?;
                }
                b'J' => {
                    let v = r.u32()? as i32;
                    self.push(Obj::Int(v.into()))?;
                }
                b'K' => {
                    let v = r.u8()?;
                    self.push(Obj::Int(v.into()))?;
                }
                b'M' => {
                    let v = r.u16()?;
                    self.push(Obj::Int(v.into()))?;
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes
                    let n = r.u8()? as usize;
                    if n > 8 {
                        return Err(format!("LONG1 of {n} bytes is larger than any size"));
                    }
                    let b = r.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= i64::from(byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Obj::Int(v))?;
                }
                b'G' => {
                    let b = r.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().map_err(|_| "BINFLOAT")?);
                    self.push(Obj::Float(v))?;
                }
                b'q' => {
                    let k = r.u8()?;
                    self.memo_put(k.into())?;
                }
                b'r' => {
                    let k = r.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = r.u8()?;
                    self.memo_get(k.into())?;
                }
                b'j' => {
                    let k = r.u32()?;
                    self.memo_get(k)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Obj::Tuple(items))?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err("stack underflow".into());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Obj::Tuple(items))?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.push(persistent_storage(pid)?)?;
                }
                b'R' => {
                    let (args, f) = (self.pop()?, self.pop()?);
                    self.push(call(f, args)?)?;
                }
                b's' => {
                    let (v, k) = (self.pop()?, self.pop()?);
                    self.dict_top()?.borrow_mut().push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err("SETITEMS with an odd number of items".into());
                    }
                    let dict = self.dict_top()?;
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        dict.borrow_mut().push((k, v));
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    self.list_top()?.borrow_mut().push(v);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.list_top()?.borrow_mut().extend(items);
                }
                b'b' => {
                    // BUILD: the attributes of a dict (an OrderedDict's `_metadata` of
                    // versions); nothing we compute with, and nothing is called.
                    let state = self.pop()?;
                    match (self.stack.last(), &state) {
                        (Some(Obj::Dict(_)), Obj::Dict(_) | Obj::None) => {}
                        (top, _) => {
                            let top = top.map_or("nothing".into(), kind);
                            return Err(format!(
                                "BUILD of {top} with {}: only a state dict's attributes are \
                                 accepted",
                                kind(&state)
                            ));
                        }
                    }
                }
                b'.' => {
                    let top = self.pop()?;
                    return Ok(top);
                }
                other => {
                    return Err(format!(
                        "opcode 0x{other:02x} ({:?}) at byte {at} is not one a state dict uses; \
                         this reader only rebuilds tensors",
                        other as char
                    ));
                }
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) -> R<()> {
        match known_global(module, name) {
            Some(g) => self.push(Obj::Global(g)),
            None => Err(format!(
                "the pickle names the global `{module}.{name}`, which is not a tensor or \
                 state-dict building block; refusing to load it (this reader never runs code)"
            )),
        }
    }

    fn dict_top(&self) -> R<DictCell> {
        match self.stack.last() {
            Some(Obj::Dict(d)) => Ok(d.clone()),
            other => Err(format!(
                "SETITEM on {}, not a dict",
                other.map_or("nothing".into(), kind)
            )),
        }
    }

    fn list_top(&self) -> R<Rc<RefCell<Vec<Obj>>>> {
        match self.stack.last() {
            Some(Obj::List(l)) => Ok(l.clone()),
            other => Err(format!(
                "APPEND on {}, not a list",
                other.map_or("nothing".into(), kind)
            )),
        }
    }
}

/// `('storage', <dtype global>, key, location, numel)` → a storage.
fn persistent_storage(pid: Obj) -> R<Obj> {
    let Obj::Tuple(items) = pid else {
        return Err(format!(
            "persistent id is {}, not a storage tuple",
            kind(&pid)
        ));
    };
    match items.as_slice() {
        [
            Obj::Str(tag),
            Obj::Global(class),
            Obj::Str(key),
            Obj::Str(_location),
            Obj::Int(numel),
        ] if tag == "storage" && *numel >= 0 => {
            let dtype = match *class {
                "torch.FloatStorage" => Dtype::F32,
                "torch.HalfStorage" => Dtype::F16,
                "torch.BFloat16Storage" => Dtype::BF16,
                other => return Err(format!("`{other}` is not a storage type")),
            };
            Ok(Obj::Storage(dtype, key.clone(), *numel as usize))
        }
        _ => Err("persistent id is not ('storage', type, key, location, numel)".into()),
    }
}

fn usizes(o: &Obj, what: &str) -> R<Vec<usize>> {
    let Obj::Tuple(items) = o else {
        return Err(format!("{what} is {}, not a tuple", kind(o)));
    };
    items
        .iter()
        .map(|i| match i {
            Obj::Int(v) if *v >= 0 => Ok(*v as usize),
            other => Err(format!("{what} holds {}", kind(other))),
        })
        .collect()
}

/// REDUCE: the known callables, rebuilt by hand.
fn call(f: Obj, args: Obj) -> R<Obj> {
    let Obj::Global(g) = f else {
        return Err(format!("REDUCE calls {}, not a known global", kind(&f)));
    };
    let Obj::Tuple(args) = args else {
        return Err(format!("REDUCE of `{g}` with {}", kind(&args)));
    };
    match g {
        ORDERED_DICT if args.is_empty() => Ok(Obj::Dict(Rc::default())),
        REBUILD_TENSOR if (6..=7).contains(&args.len()) => {
            let Obj::Storage(dtype, key, numel) = &args[0] else {
                return Err(format!("`{g}` of {}, not a storage", kind(&args[0])));
            };
            let Obj::Int(offset) = args[1] else {
                return Err(format!("`{g}`: storage offset is {}", kind(&args[1])));
            };
            let shape = usizes(&args[2], "size")?;
            let stride = usizes(&args[3], "stride")?;
            if shape.len() != stride.len() || offset < 0 {
                return Err(format!(
                    "`{g}`: size {shape:?}, stride {stride:?}, offset {offset}"
                ));
            }
            Ok(Obj::Tensor(Box::new(TensorRef {
                key: key.clone(),
                dtype: *dtype,
                numel: *numel,
                offset: offset as usize,
                shape,
                stride,
            })))
        }
        REBUILD_PARAMETER if (2..=3).contains(&args.len()) => match &args[0] {
            Obj::Tensor(_) => Ok(args[0].clone()),
            other => Err(format!("`{g}` of {}", kind(other))),
        },
        _ => Err(format!("`{g}` called with {} argument(s)", args.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> R<Obj> {
        Machine::default().run(bytes)
    }

    #[test]
    fn a_foreign_global_is_refused_by_name() {
        let e = run(b"\x80\x02cposix\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85R.").unwrap_err();
        assert!(
            e.contains("`posix.system`") && e.contains("never runs code"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_opcode_is_refused_by_name() {
        let e = run(b"\x80\x02I1\n.").unwrap_err();
        assert!(e.contains("opcode 0x49 ('I')"), "{e}");
    }
}
