//! Restricted pickle reader shared by the CIFAR python batches (`datasets::ndarray`) and PyTorch
//! checkpoints (`torch_file`): builds a symbolic value tree without executing anything.
//!
//! Globals (GLOBAL / STACK_GLOBAL) become symbolic names, REDUCE / BUILD / NEWOBJ become
//! symbolic nodes and persistent ids (PERSID / BINPERSID) stay symbolic references for the
//! caller to resolve; nothing is imported or called. Values live in an arena and the stack and memo
//! hold arena indices, so in-place mutation (APPEND, SETITEM, BUILD) stays visible through memo
//! references exactly as with Python's unpickler.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Why a byte stream is not a pickle this reader understands.
#[derive(Debug, thiserror::Error)]
pub enum PickleError {
    #[error("{}: unsupported pickle opcode {opcode:#04x} at byte offset {offset}", path.display())]
    UnknownOpcode {
        path: PathBuf,
        opcode: u8,
        offset: usize,
    },
    #[error("{}: malformed pickle at byte offset {offset}: {msg}", path.display())]
    Malformed {
        path: PathBuf,
        offset: usize,
        msg: String,
    },
}

/// Index of a node in [`Pickle::nodes`].
pub type Id = usize;

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// A Python str (BINUNICODE and friends).
    Str(String),
    /// A Python 2 str / Python 3 bytes / bytearray (BINSTRING, BINBYTES, BYTEARRAY8 ...).
    Bytes(Vec<u8>),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// `module.name`, never resolved.
    Global {
        module: String,
        name: String,
    },
    /// `func(*args)`, never called.
    Reduce {
        func: Id,
        args: Id,
    },
    /// `cls.__new__(cls, *args)`, never called.
    NewObj {
        cls: Id,
        args: Id,
    },
    /// `obj.__setstate__(state)`, never called. Replaces `obj` in place.
    Build {
        obj: Id,
        state: Id,
    },
    /// `obj[k] = v` for each pair (SETITEM(S) on an object that is not a plain dict, e.g. an
    /// `OrderedDict` or a dict subclass rebuilt by REDUCE / NEWOBJ). Replaces `obj` in place.
    SetItems {
        obj: Id,
        items: Vec<(Id, Id)>,
    },
    /// `obj.extend(items)` (APPEND(S) on an object that is not a plain list). Replaces `obj`
    /// in place.
    Appends {
        obj: Id,
        items: Vec<Id>,
    },
    /// `persistent_load(pid)`: a reference the pickle leaves to its container (PyTorch's
    /// storages), never resolved here.
    PersId(Id),
}

/// A decoded pickle: the node arena and the id of the root value.
#[derive(Debug)]
pub struct Pickle {
    pub nodes: Vec<Node>,
    pub root: Id,
    /// Bytes read, up to and including STOP: where a following pickle in the same stream
    /// starts (PyTorch's legacy format is several pickles in a row).
    pub len: usize,
}

/// Decodes the pickle at the start of `data` (read from `path`, used in messages) into a
/// symbolic tree; bytes after its STOP opcode are left alone.
pub fn parse(path: &Path, data: &[u8]) -> Result<Pickle, PickleError> {
    Vm {
        path,
        data,
        pos: 0,
        nodes: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
}

struct Vm<'a> {
    path: &'a Path,
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

impl<'a> Vm<'a> {
    fn err(&self, offset: usize, msg: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            path: self.path.to_path_buf(),
            offset,
            msg: msg.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let data: &'a [u8] = self.data;
        match self.pos.checked_add(n) {
            Some(end) if end <= data.len() => {
                let s = &data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(self.err(
                self.pos,
                format!(
                    "needs {n} more bytes but the file ends after {} (truncated file?)",
                    data.len() - self.pos
                ),
            )),
        }
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PickleError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, PickleError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn i32(&mut self) -> Result<i32, PickleError> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, PickleError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len_u64(&mut self, at: usize) -> Result<usize, PickleError> {
        let n = self.u64()?;
        usize::try_from(n).map_err(|_| self.err(at, format!("length {n} too large")))
    }

    /// A newline-terminated text argument (GLOBAL, PUT, GET, INT).
    fn line(&mut self) -> Result<&'a str, PickleError> {
        let data: &'a [u8] = self.data;
        let start = self.pos;
        let rel = data[start..]
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err(start, "unterminated text argument"))?;
        self.pos = start + rel + 1;
        std::str::from_utf8(&data[start..start + rel])
            .map_err(|_| self.err(start, "text argument is not UTF-8"))
    }

    fn push(&mut self, node: Node) {
        self.nodes.push(node);
        self.stack.push(self.nodes.len() - 1);
    }

    fn pop(&mut self, at: usize) -> Result<Id, PickleError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(self.err(at, "stack underflow (popped past a MARK)"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.err(at, "stack underflow"))
    }

    fn top(&self, at: usize) -> Result<Id, PickleError> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err(at, "stack is empty"))
    }

    /// Pops everything above the topmost MARK, and the mark.
    fn pop_mark(&mut self, at: usize) -> Result<Vec<Id>, PickleError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err(at, "no MARK on the stack"))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_get(&self, at: usize, key: u64) -> Result<Id, PickleError> {
        self.memo
            .get(&key)
            .copied()
            .ok_or_else(|| self.err(at, format!("memo key {key} was never stored")))
    }

    fn memo_put(&mut self, at: usize, key: u64) -> Result<(), PickleError> {
        let top = self.top(at)?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn push_bytes(&mut self, n: usize) -> Result<(), PickleError> {
        let b = self.take(n)?.to_vec();
        self.push(Node::Bytes(b));
        Ok(())
    }

    fn push_str(&mut self, at: usize, n: usize) -> Result<(), PickleError> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b)
            .map_err(|_| self.err(at, "unicode string is not valid UTF-8"))?
            .to_string();
        self.push(Node::Str(s));
        Ok(())
    }

    fn append_to(&mut self, at: usize, target: Id, items: Vec<Id>) -> Result<(), PickleError> {
        match &mut self.nodes[target] {
            Node::List(v) | Node::Set(v) | Node::Appends { items: v, .. } => {
                v.extend(items);
                Ok(())
            }
            Node::Reduce { .. } | Node::NewObj { .. } | Node::Build { .. } => {
                let obj = self.wrap_in_place(target);
                self.nodes[target] = Node::Appends { obj, items };
                Ok(())
            }
            other => {
                let kind = node_kind(other);
                Err(self.err(
                    at,
                    format!("APPEND(S)/ADDITEMS on a {kind}, expected a list"),
                ))
            }
        }
    }

    fn set_items(&mut self, at: usize, target: Id, items: Vec<Id>) -> Result<(), PickleError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.err(at, "SETITEMS with an odd number of items"));
        }
        let pairs = items.chunks(2).map(|p| (p[0], p[1]));
        match &mut self.nodes[target] {
            Node::Dict(d) | Node::SetItems { items: d, .. } => {
                // A repeated key is kept; lookups take the last one, as Python's dict would.
                d.extend(pairs);
                Ok(())
            }
            Node::Reduce { .. } | Node::NewObj { .. } | Node::Build { .. } => {
                let items = pairs.collect();
                let obj = self.wrap_in_place(target);
                self.nodes[target] = Node::SetItems { obj, items };
                Ok(())
            }
            other => {
                let kind = node_kind(other);
                Err(self.err(at, format!("SETITEM(S) on a {kind}, expected a dict")))
            }
        }
    }

    /// Moves the node at `target` to a fresh slot and returns that slot, so that `target` can
    /// be replaced by a node wrapping it while memo references keep pointing at `target`.
    fn wrap_in_place(&mut self, target: Id) -> Id {
        let old = std::mem::replace(&mut self.nodes[target], Node::None);
        self.nodes.push(old);
        self.nodes.len() - 1
    }

    fn run(mut self) -> Result<Pickle, PickleError> {
        loop {
            let at = self.pos;
            let op = match self.take(1) {
                Ok(b) => b[0],
                Err(_) => return Err(self.err(at, "file ends before the STOP opcode (truncated?)")),
            };
            match op {
                // PROTO
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(
                            at,
                            format!("pickle protocol {p} is not supported (2-5 are)"),
                        ));
                    }
                }
                // FRAME: only a hint for buffering.
                0x95 => {
                    self.u64()?;
                }
                // STOP
                b'.' => {
                    let root = self.pop(at)?;
                    return Ok(Pickle {
                        nodes: self.nodes,
                        root,
                        len: self.pos,
                    });
                }
                // MARK
                b'(' => self.marks.push(self.stack.len()),
                // POP
                b'0' => {
                    if self.marks.last().is_some_and(|&m| m == self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop(at)?;
                    }
                }
                // POP_MARK
                b'1' => {
                    self.pop_mark(at)?;
                }
                // DUP
                b'2' => {
                    let t = self.top(at)?;
                    self.stack.push(t);
                }
                // NONE, NEWTRUE, NEWFALSE
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                // BININT, BININT1, BININT2
                b'J' => {
                    let v = self.i32()?;
                    self.push(Node::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Node::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Node::Int(v as i64));
                }
                // INT (protocol 0 text form; "00"/"01" are False/True)
                b'I' => {
                    let s = self.line()?;
                    let node = match s {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        _ => Node::Int(
                            s.trim()
                                .parse()
                                .map_err(|_| self.err(at, format!("bad INT argument {s:?}")))?,
                        ),
                    };
                    self.push(node);
                }
                // LONG1, LONG4: little-endian two's complement.
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        let n = self.i32()?;
                        usize::try_from(n).map_err(|_| self.err(at, "negative LONG4 length"))?
                    };
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(
                            self.err(at, format!("integer of {n} bytes does not fit in 64 bits"))
                        );
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Node::Int(v));
                }
                // BINFLOAT: big-endian double.
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.push(Node::Float(v));
                }
                // BINSTRING, SHORT_BINSTRING (Python 2 str): raw bytes.
                b'T' => {
                    let n = self.i32()?;
                    let n = usize::try_from(n)
                        .map_err(|_| self.err(at, "negative BINSTRING length"))?;
                    self.push_bytes(n)?;
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    self.push_bytes(n)?;
                }
                // BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8
                b'B' => {
                    let n = self.u32()? as usize;
                    self.push_bytes(n)?;
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    self.push_bytes(n)?;
                }
                0x8e | 0x96 => {
                    let n = self.len_u64(at)?;
                    self.push_bytes(n)?;
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                b'X' => {
                    let n = self.u32()? as usize;
                    self.push_str(at, n)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    self.push_str(at, n)?;
                }
                0x8d => {
                    let n = self.len_u64(at)?;
                    self.push_str(at, n)?;
                }
                // EMPTY_TUPLE, TUPLE, TUPLE1..3
                b')' => self.push(Node::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop(at)?);
                    }
                    items.reverse();
                    self.push(Node::Tuple(items));
                }
                // EMPTY_LIST, LIST, APPEND, APPENDS
                b']' => self.push(Node::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::List(items));
                }
                b'a' => {
                    let item = self.pop(at)?;
                    let list = self.top(at)?;
                    self.append_to(at, list, vec![item])?;
                }
                b'e' => {
                    let items = self.pop_mark(at)?;
                    let list = self.top(at)?;
                    self.append_to(at, list, items)?;
                }
                // EMPTY_DICT, DICT, SETITEM, SETITEMS
                b'}' => self.push(Node::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::Dict(Vec::new()));
                    let d = self.top(at)?;
                    self.set_items(at, d, items)?;
                }
                b's' => {
                    let v = self.pop(at)?;
                    let k = self.pop(at)?;
                    let d = self.top(at)?;
                    self.set_items(at, d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark(at)?;
                    let d = self.top(at)?;
                    self.set_items(at, d, items)?;
                }
                // EMPTY_SET, ADDITEMS, FROZENSET
                0x8f => self.push(Node::Set(Vec::new())),
                0x90 => {
                    let items = self.pop_mark(at)?;
                    let s = self.top(at)?;
                    self.append_to(at, s, items)?;
                }
                0x91 => {
                    let items = self.pop_mark(at)?;
                    self.push(Node::Set(items));
                }
                // PUT, BINPUT, LONG_BINPUT, MEMOIZE
                b'p' => {
                    let s = self.line()?;
                    let key = s
                        .parse()
                        .map_err(|_| self.err(at, format!("bad PUT key {s:?}")))?;
                    self.memo_put(at, key)?;
                }
                b'q' => {
                    let key = self.u8()? as u64;
                    self.memo_put(at, key)?;
                }
                b'r' => {
                    let key = self.u32()? as u64;
                    self.memo_put(at, key)?;
                }
                0x94 => {
                    let key = self.memo.len() as u64;
                    self.memo_put(at, key)?;
                }
                // GET, BINGET, LONG_BINGET
                b'g' => {
                    let s = self.line()?;
                    let key = s
                        .parse()
                        .map_err(|_| self.err(at, format!("bad GET key {s:?}")))?;
                    let id = self.memo_get(at, key)?;
                    self.stack.push(id);
                }
                b'h' => {
                    let key = self.u8()? as u64;
                    let id = self.memo_get(at, key)?;
                    self.stack.push(id);
                }
                b'j' => {
                    let key = self.u32()? as u64;
                    let id = self.memo_get(at, key)?;
                    self.stack.push(id);
                }
                // GLOBAL, STACK_GLOBAL: symbolic names only.
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(Node::Global { module, name });
                }
                0x93 => {
                    let name = self.pop(at)?;
                    let module = self.pop(at)?;
                    let (Node::Str(module), Node::Str(name)) =
                        (&self.nodes[module], &self.nodes[name])
                    else {
                        return Err(self.err(at, "STACK_GLOBAL needs two str operands"));
                    };
                    let node = Node::Global {
                        module: module.clone(),
                        name: name.clone(),
                    };
                    self.push(node);
                }
                // REDUCE, NEWOBJ, NEWOBJ_EX, BUILD: symbolic nodes only.
                b'R' => {
                    let args = self.pop(at)?;
                    let func = self.pop(at)?;
                    self.push(Node::Reduce { func, args });
                }
                0x81 => {
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    self.push(Node::NewObj { cls, args });
                }
                0x92 => {
                    let _kwargs = self.pop(at)?;
                    let args = self.pop(at)?;
                    let cls = self.pop(at)?;
                    self.push(Node::NewObj { cls, args });
                }
                b'b' => {
                    let state = self.pop(at)?;
                    let obj = self.top(at)?;
                    // Mutate in place so memo references see the built object; the previous
                    // content moves to a fresh node.
                    let inner = self.wrap_in_place(obj);
                    self.nodes[obj] = Node::Build { obj: inner, state };
                }
                // PERSID (text id), BINPERSID (id popped from the stack): symbolic.
                b'P' => {
                    let s = self.line()?.to_string();
                    self.nodes.push(Node::Str(s));
                    let pid = self.nodes.len() - 1;
                    self.push(Node::PersId(pid));
                }
                b'Q' => {
                    let pid = self.pop(at)?;
                    self.push(Node::PersId(pid));
                }
                _ => {
                    return Err(PickleError::UnknownOpcode {
                        path: self.path.to_path_buf(),
                        opcode: op,
                        offset: at,
                    })
                }
            }
        }
    }
}

pub(crate) fn node_kind(n: &Node) -> &'static str {
    match n {
        Node::None => "None",
        Node::Bool(_) => "bool",
        Node::Int(_) => "int",
        Node::Float(_) => "float",
        Node::Str(_) => "str",
        Node::Bytes(_) => "bytes",
        Node::Tuple(_) => "tuple",
        Node::List(_) => "list",
        Node::Dict(_) => "dict",
        Node::Set(_) => "set",
        Node::Global { .. } => "global",
        Node::Reduce { .. } => "reduce",
        Node::NewObj { .. } => "newobj",
        Node::Build { .. } => "build",
        Node::SetItems { .. } => "object with items",
        Node::Appends { .. } => "object with appended items",
        Node::PersId(_) => "persistent id",
    }
}

impl Pickle {
    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    /// Byte content of a bytes-like node: raw bytes, a str taken as latin1 (how Python 2 str
    /// data reads back with `encoding='latin1'`), or `_codecs.encode(str, 'latin1')` (how Python 3
    /// writes bytes at protocol 2).
    pub fn as_bytes(&self, id: Id) -> Option<Cow<'_, [u8]>> {
        match self.node(id) {
            Node::Bytes(b) => Some(Cow::Borrowed(b)),
            Node::Str(s) => latin1(s).map(Cow::Owned),
            Node::Reduce { func, args } => {
                if !self.is_global(*func, &["_codecs"], "encode") {
                    return None;
                }
                let Node::Tuple(a) = self.node(*args) else {
                    return None;
                };
                let Node::Str(s) = self.node(*a.first()?) else {
                    return None;
                };
                match a.get(1).map(|&e| self.node(e)) {
                    None => s.is_ascii().then(|| Cow::Owned(s.as_bytes().to_vec())),
                    Some(Node::Str(enc)) if is_latin1_name(enc) => latin1(s).map(Cow::Owned),
                    Some(Node::Str(enc))
                        if enc.eq_ignore_ascii_case("utf-8")
                            || enc.eq_ignore_ascii_case("utf8") =>
                    {
                        Some(Cow::Owned(s.as_bytes().to_vec()))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    pub fn as_int(&self, id: Id) -> Option<i64> {
        match self.node(id) {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn is_global(&self, id: Id, modules: &[&str], name: &str) -> bool {
        matches!(self.node(id), Node::Global { module, name: n } if n == name && modules.contains(&module.as_str()))
    }

    /// Value stored under `key` in the root dict; keys may be str or bytes.
    pub fn dict_get(&self, key: &str) -> Option<Id> {
        let Node::Dict(items) = self.node(self.root) else {
            return None;
        };
        items
            .iter()
            .rev()
            .find(|&&(k, _)| self.as_bytes(k).is_some_and(|b| &*b == key.as_bytes()))
            .map(|&(_, v)| v)
    }

    /// True when the root is a dict.
    pub fn root_is_dict(&self) -> bool {
        matches!(self.node(self.root), Node::Dict(_))
    }

    /// The items of a list or tuple of ints.
    pub fn int_list(&self, id: Id) -> Option<Vec<i64>> {
        match self.node(id) {
            Node::List(items) | Node::Tuple(items) => {
                items.iter().map(|&i| self.as_int(i)).collect()
            }
            _ => None,
        }
    }

    /// `module.name` for a global, else the kind of node (for messages).
    pub fn describe(&self, id: Id) -> String {
        match self.node(id) {
            Node::Global { module, name } => format!("{module}.{name}"),
            other => format!("a {}", node_kind(other)),
        }
    }
}

fn is_latin1_name(enc: &str) -> bool {
    ["latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"]
        .iter()
        .any(|e| enc.eq_ignore_ascii_case(e))
}

/// Encodes a str as latin1; None when a character is above U+00FF.
fn latin1(s: &str) -> Option<Vec<u8>> {
    s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(bytes: &[u8]) -> Pickle {
        parse(Path::new("mem.pkl"), bytes).unwrap()
    }

    #[test]
    fn scalars_and_containers() {
        // [1, -2, 300, 70000, LONG1(-1), LONG1(2**32), True, None, 1.5, 'é', b'xy']
        let mut b = vec![0x80, 2, b']', b'(', b'K', 1, b'J'];
        b.extend_from_slice(&(-2i32).to_le_bytes());
        b.extend_from_slice(&[b'M', 0x2c, 0x01, b'J']);
        b.extend_from_slice(&70000i32.to_le_bytes());
        b.extend_from_slice(&[0x8a, 1, 0xff, 0x8a, 6, 0, 0, 0, 0, 1, 0, 0x88, b'N', b'G']);
        b.extend_from_slice(&1.5f64.to_be_bytes());
        b.extend_from_slice(&[0x8c, 2, 0xc3, 0xa9, b'C', 2, b'x', b'y', b'e', b'.']);
        let t = p(&b);
        let Node::List(items) = t.node(t.root) else {
            panic!()
        };
        let vals: Vec<&Node> = items.iter().map(|&i| t.node(i)).collect();
        assert_eq!(
            vals,
            [
                &Node::Int(1),
                &Node::Int(-2),
                &Node::Int(300),
                &Node::Int(70000),
                &Node::Int(-1),
                &Node::Int(1 << 32),
                &Node::Bool(true),
                &Node::None,
                &Node::Float(1.5),
                &Node::Str("é".into()),
                &Node::Bytes(b"xy".to_vec()),
            ]
        );
        // 'é' as latin1 is one byte.
        assert_eq!(&*t.as_bytes(items[9]).unwrap(), &[0xe9]);
    }

    #[test]
    fn memo_references_see_mutation() {
        // l = []; memo[0] = l; l.append(5); (l, memo[0])
        let t = p(&[0x80, 4, b']', 0x94, b'K', 5, b'a', b'h', 0, 0x86, b'.']);
        let Node::Tuple(items) = t.node(t.root) else {
            panic!()
        };
        assert_eq!(items[0], items[1]);
        assert_eq!(t.int_list(items[1]), Some(vec![5]));
    }

    #[test]
    fn codecs_encode_is_bytes() {
        // _codecs.encode('ab\xff', 'latin1') as Python 3 writes bytes at protocol 2.
        let mut b = vec![0x80, 2, b'c'];
        b.extend_from_slice(b"_codecs\nencode\n");
        b.extend_from_slice(&[b'X', 4, 0, 0, 0, b'a', b'b', 0xc3, 0xbf, b'X', 6, 0, 0, 0]);
        b.extend_from_slice(b"latin1");
        b.extend_from_slice(&[0x86, b'R', b'.']);
        let t = p(&b);
        assert_eq!(&*t.as_bytes(t.root).unwrap(), b"ab\xff");
    }

    #[test]
    fn persistent_ids_and_items_set_on_objects_stay_symbolic() {
        // od = collections.OrderedDict(); od['k'] = persistent_load(('s', 1)) (BINPERSID);
        // od.__setstate__({}) ; then [od, persistent_load('7') (PERSID)]
        let mut b = vec![0x80, 2, b']', b'c'];
        b.extend_from_slice(b"collections\nOrderedDict\n)R(");
        b.extend_from_slice(&[
            0x8c, 1, b'k', 0x8c, 1, b's', b'K', 1, 0x86, b'Q', b'u', b'}',
        ]);
        b.extend_from_slice(b"ba(P7\ne.");
        let t = p(&b);
        let Node::List(items) = t.node(t.root) else {
            panic!("{:?}", t.node(t.root))
        };
        let Node::Build { obj, .. } = t.node(items[0]) else {
            panic!()
        };
        let Node::SetItems { obj: od, items: kv } = t.node(*obj) else {
            panic!()
        };
        assert!(
            matches!(t.node(*od), Node::Reduce { func, .. } if t.is_global(*func, &["collections"], "OrderedDict"))
        );
        assert_eq!(t.node(kv[0].0), &Node::Str("k".into()));
        let Node::PersId(pid) = t.node(kv[0].1) else {
            panic!()
        };
        let Node::Tuple(pid) = t.node(*pid) else {
            panic!()
        };
        assert_eq!(t.node(pid[1]), &Node::Int(1));
        let Node::PersId(text) = t.node(items[1]) else {
            panic!()
        };
        assert_eq!(t.node(*text), &Node::Str("7".into()));
    }

    #[test]
    fn malformed_streams() {
        let path = Path::new("bad.pkl");
        let msg = |b: &[u8]| parse(path, b).unwrap_err().to_string();
        assert!(msg(&[0x80, 2, b'K']).contains("truncated"));
        assert!(msg(&[0x80, 2, b'K', 1]).contains("before the STOP"));
        assert!(msg(&[0x80, 2, b'h', 3, b'.']).contains("memo key 3"));
        assert!(msg(&[0x80, 2, b'e', b'.']).contains("no MARK"));
        assert!(msg(&[0x80, 2, b'K', 1, b'a', b'.']).contains("stack is empty"));
        assert!(msg(&[0x80, 6, b'.']).contains("protocol 6"));
        let m = msg(&[0x80, 2, b'N', 0xa0, b'.']);
        assert!(
            m.contains("bad.pkl") && m.contains("0xa0") && m.contains("offset 3"),
            "{m}"
        );
    }
}
