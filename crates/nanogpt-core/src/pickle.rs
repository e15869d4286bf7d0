//! A Python pickle reader that only builds data, for PyTorch checkpoints (`data.pkl` inside a `ckpt.pt`)
//! and dataset vocabularies (`meta.pkl`), and a writer of the same subset.
//!
//! A pickle is a program for a stack machine whose `GLOBAL` and `REDUCE` opcodes import and call any Python
//! function. This reader calls nothing: it knows the handful of globals a checkpoint holds (torch's tensor
//! rebuild function, its storage types, `collections.OrderedDict`) and turns each into data; any other
//! global stops the read with an error that names it.

use std::collections::HashMap;

use candle_core::{DType, Result};
use serde_json::{Map, Number, Value as Json};

/// A pickled value, after the known globals have been turned into data.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Keys in insertion order (dicts and OrderedDicts alike).
    Dict(Vec<(Value, Value)>),
    /// A view of a storage: `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    Tensor(TensorRef),
    /// A persistent id `('storage', <dtype>, key, location, numel)`: the bytes are the zip entry `data/<key>`.
    Storage {
        dtype: DType,
        key: String,
    },
    /// An allowed global before it is called.
    Global(Global),
    /// The `MARK` opcode's stack entry.
    Mark,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    pub dtype: DType,
    pub storage: String,
    /// In elements, as torch counts them.
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    StorageType(DType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Result<Self> {
        let storage = |dtype| Ok(Global::StorageType(dtype));
        match (module, name) {
            ("collections", "OrderedDict") => Ok(Global::OrderedDict),
            ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensor),
            ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
            ("torch", "FloatStorage") => storage(DType::F32),
            ("torch", "HalfStorage") => storage(DType::F16),
            ("torch", "BFloat16Storage") => storage(DType::BF16),
            ("torch", "DoubleStorage") => storage(DType::F64),
            ("torch", "LongStorage") => storage(DType::I64),
            ("torch", "IntStorage") => storage(DType::I32),
            ("torch", "ByteStorage") | ("torch", "BoolStorage") => storage(DType::U8),
            _ => candle_core::bail!(
                "refusing the pickle: it calls `{module}.{name}`, which a checkpoint never holds (only torch tensors and plain values are read; nothing in the file is run)"
            ),
        }
    }
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    pub fn as_float(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) | Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The entry of a dict under the string key `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// Plain data as JSON: dict keys become strings (`{0: 'a'}` gives `{"0": "a"}`), tuples become arrays,
    /// bytes and tensors are refused (they are not plain data).
    pub fn to_json(&self) -> Result<Json> {
        Ok(match self {
            Value::None => Json::Null,
            Value::Bool(b) => Json::Bool(*b),
            Value::Int(i) => Json::Number((*i).into()),
            Value::Float(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
            Value::Str(s) => Json::String(s.clone()),
            Value::List(items) | Value::Tuple(items) => Json::Array(items.iter().map(Value::to_json).collect::<Result<_>>()?),
            Value::Dict(items) => {
                let mut map = Map::new();
                for (k, v) in items {
                    let key = match k {
                        Value::Str(s) => s.clone(),
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                        other => candle_core::bail!("the pickle has a dict key that is not a string or number: {other:?}"),
                    };
                    map.insert(key, v.to_json()?);
                }
                Json::Object(map)
            }
            Value::Bytes(_) | Value::Tensor(_) | Value::Storage { .. } | Value::Global(_) | Value::Mark => {
                candle_core::bail!("the pickle holds {} where plain data was expected", self.kind())
            }
        })
    }

    /// How many values this one holds, itself included.
    fn nodes(&self) -> usize {
        1 + match self {
            Value::List(items) | Value::Tuple(items) => items.iter().map(Value::nodes).sum(),
            Value::Dict(items) => items.iter().map(|(k, v)| k.nodes() + v.nodes()).sum(),
            _ => 0,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Bytes(_) => "bytes",
            Value::Tensor(_) => "a tensor",
            Value::Storage { .. } => "a storage",
            Value::Global(_) => "a class or function",
            _ => "a value",
        }
    }
}

/// Reads one pickle (protocols 2 to 4, the ones `torch.save` and `pickle.dump` write).
pub fn read(bytes: &[u8]) -> Result<Value> {
    // Each fetch from the memo copies a value; nested fetches could make a small file expand exponentially.
    let copy_budget = 64 * bytes.len() + (1 << 20);
    Reader { bytes, pos: 0, stack: Vec::new(), memo: HashMap::new(), copy_budget }.run()
}

/// A pickle that holds plain data (e.g. nanoGPT's `meta.pkl`) as JSON text.
pub fn to_json_string(bytes: &[u8]) -> Result<String> {
    Ok(read(bytes)?.to_json()?.to_string())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Values are copied into the memo, not shared: a container memoized empty, filled, then fetched again would
    /// come back empty. torch.save and pickle.dump of plain data fetch only finished values (names, strings, tuples).
    memo: HashMap<u32, Value>,
    /// Values the memo may still copy out, in nodes.
    copy_budget: usize,
}

fn truncated() -> candle_core::Error {
    candle_core::Error::Msg("the pickle ends early: the file is truncated or damaged".into())
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or_else(truncated)?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.bytes[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(truncated)?;
        let line = self.take(n + 1)?;
        std::str::from_utf8(&line[..n]).map_err(|_| candle_core::Error::Msg("the pickle has a name that is not UTF-8".into()))
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(String::from_utf8_lossy(bytes).into_owned()))
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().ok_or_else(|| candle_core::Error::Msg("the pickle is malformed (its stack runs empty)".into()))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().ok_or_else(|| candle_core::Error::Msg("the pickle is malformed (its stack runs empty)".into()))
    }

    /// The values pushed since the last `MARK`, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .ok_or_else(|| candle_core::Error::Msg("the pickle is malformed (no MARK)".into()))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items)
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        candle_core::bail!("the pickle uses protocol {proto}; protocols up to 5 are read");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: only a length hint
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    if n > 8 {
                        candle_core::bail!("the pickle holds an integer wider than 64 bits");
                    }
                    let mut buf = [if bytes.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 }; 8];
                    buf[..n].copy_from_slice(bytes);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                0x8d => {
                    let n = usize::try_from(self.u64()?).map_err(|_| truncated())?;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'U' => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'T' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v)
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(bytes))
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let bytes = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(bytes))
                }
                b']' => self.stack.push(Value::List(Vec::new())),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items))
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        return Err(truncated());
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(items))
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let dict = pairs(items)?;
                    self.stack.push(Value::Dict(dict))
                }
                b'a' => {
                    let item = self.pop()?;
                    match self.top()? {
                        Value::List(items) => items.push(item),
                        _ => candle_core::bail!("the pickle appends to something that is not a list"),
                    }
                }
                b'e' => {
                    let new = self.pop_mark()?;
                    match self.top()? {
                        Value::List(items) => items.extend(new),
                        _ => candle_core::bail!("the pickle appends to something that is not a list"),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    set_items(self.top()?, vec![(k, v)])?
                }
                b'u' => {
                    let items = pairs(self.pop_mark()?)?;
                    set_items(self.top()?, items)?
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v)
                }
                b'q' => {
                    let key = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(key, v);
                }
                b'r' => {
                    let key = self.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(key, v);
                }
                0x94 => {
                    let key = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(key, v);
                }
                b'h' => {
                    let key = self.u8()? as u32;
                    self.get_memo(key)?
                }
                b'j' => {
                    let key = self.u32()?;
                    self.get_memo(key)?
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(Global::resolve(module, name)?))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module.as_str(), name.as_str()) {
                        (Some(module), Some(name)) => self.stack.push(Value::Global(Global::resolve(module, name)?)),
                        _ => candle_core::bail!("the pickle is malformed (STACK_GLOBAL without two names)"),
                    }
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let value = call(callable, args)?;
                    self.stack.push(value)
                }
                b'b' => {
                    // BUILD sets attributes, e.g. a state dict's `_metadata`; data-wise nothing changes.
                    self.pop()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let value = persistent(pid)?;
                    self.stack.push(value)
                }
                other => candle_core::bail!("the pickle uses opcode 0x{other:02x}, which a checkpoint never holds"),
            }
        }
    }

    fn get_memo(&mut self, key: u32) -> Result<()> {
        let v = self.memo.get(&key).ok_or_else(|| candle_core::Error::Msg("the pickle is malformed (unknown memo entry)".into()))?;
        self.copy_budget = self.copy_budget.checked_sub(v.nodes()).ok_or_else(|| {
            candle_core::Error::Msg("the pickle repeats its values far beyond its size, which a checkpoint never does".into())
        })?;
        let v = v.clone();
        self.stack.push(v);
        Ok(())
    }
}

fn pairs(items: Vec<Value>) -> Result<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        candle_core::bail!("the pickle is malformed (a dict with an odd number of items)");
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn set_items(target: &mut Value, items: Vec<(Value, Value)>) -> Result<()> {
    let Value::Dict(dict) = target else { candle_core::bail!("the pickle sets items of something that is not a dict") };
    for (k, v) in items {
        match dict.iter_mut().find(|(existing, _)| *existing == k) {
            Some(slot) => slot.1 = v,
            None => dict.push((k, v)),
        }
    }
    Ok(())
}

/// The data an allowed global gives when called with `args`.
fn call(callable: Value, args: Value) -> Result<Value> {
    let Value::Global(global) = callable else { candle_core::bail!("the pickle calls something that is not a function") };
    let args = match args {
        Value::Tuple(args) => args,
        _ => candle_core::bail!("the pickle calls a function without an argument tuple"),
    };
    match global {
        Global::OrderedDict => Ok(Value::Dict(Vec::new())),
        Global::RebuildParameter => {
            args.into_iter().next().ok_or_else(|| candle_core::Error::Msg("the pickle rebuilds a parameter without data".into()))
        }
        Global::RebuildTensor => {
            let malformed = || candle_core::Error::Msg("the pickle rebuilds a tensor with malformed arguments".into());
            let [Value::Storage { dtype, key }, offset, size, stride, ..] = args.as_slice() else { return Err(malformed()) };
            let dims = |v: &Value| -> Result<Vec<usize>> {
                v.as_seq()
                    .ok_or_else(malformed)?
                    .iter()
                    .map(|d| d.as_int().and_then(|d| usize::try_from(d).ok()).ok_or_else(malformed))
                    .collect()
            };
            Ok(Value::Tensor(TensorRef {
                dtype: *dtype,
                storage: key.clone(),
                offset: offset.as_int().and_then(|o| usize::try_from(o).ok()).ok_or_else(malformed)?,
                shape: dims(size)?,
                stride: dims(stride)?,
            }))
        }
        Global::StorageType(_) => candle_core::bail!("the pickle calls a storage type, which a checkpoint never does"),
    }
}

fn persistent(pid: Value) -> Result<Value> {
    match pid {
        Value::Tuple(items) => match items.as_slice() {
            [Value::Str(kind), Value::Global(Global::StorageType(dtype)), key, ..] if kind == "storage" => {
                let key = match key {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => candle_core::bail!("the pickle names a storage with a key that is not a string"),
                };
                Ok(Value::Storage { dtype: *dtype, key })
            }
            _ => candle_core::bail!("the pickle refers to an external object that is not a torch storage"),
        },
        _ => candle_core::bail!("the pickle refers to an external object that is not a torch storage"),
    }
}

/// Writes the subset [`read`] reads, as protocol 2 (what `torch.save` writes).
pub struct Writer {
    out: Vec<u8>,
}

impl Default for Writer {
    fn default() -> Self {
        Self { out: vec![0x80, 2] }
    }
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.out.push(b'.');
        self.out
    }

    pub fn none(&mut self) {
        self.out.push(b'N');
    }

    pub fn bool(&mut self, v: bool) {
        self.out.push(if v { 0x88 } else { 0x89 });
    }

    pub fn int(&mut self, v: i64) {
        match i32::try_from(v) {
            Ok(v) => {
                self.out.push(b'J');
                self.out.extend_from_slice(&v.to_le_bytes());
            }
            Err(_) => {
                self.out.extend_from_slice(&[0x8a, 8]);
                self.out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }

    pub fn float(&mut self, v: f64) {
        self.out.push(b'G');
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub fn str(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    pub fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        for part in [module, name] {
            self.out.extend_from_slice(part.as_bytes());
            self.out.push(b'\n');
        }
    }

    pub fn mark(&mut self) {
        self.out.push(b'(');
    }

    /// Closes a tuple of everything since the last [`Writer::mark`].
    pub fn tuple(&mut self) {
        self.out.push(b't');
    }

    /// Calls the callable below the argument tuple on top.
    pub fn reduce(&mut self) {
        self.out.push(b'R');
    }

    pub fn empty_dict(&mut self) {
        self.out.push(b'}');
    }

    pub fn empty_list(&mut self) {
        self.out.push(b']');
    }

    /// Adds the key/value pairs pushed since the last mark to the dict below them.
    pub fn set_items(&mut self) {
        self.out.push(b'u');
    }

    /// Appends the values pushed since the last mark to the list below them.
    pub fn appends(&mut self) {
        self.out.push(b'e');
    }

    pub fn persistent_id(&mut self) {
        self.out.push(b'Q');
    }

    /// Plain JSON data (objects as dicts with string keys).
    pub fn json(&mut self, v: &Json) {
        match v {
            Json::Null => self.none(),
            Json::Bool(b) => self.bool(*b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => self.int(i),
                None => self.float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => self.str(s),
            Json::Array(items) => {
                self.empty_list();
                self.mark();
                items.iter().for_each(|item| self.json(item));
                self.appends();
            }
            Json::Object(map) => {
                self.empty_dict();
                self.mark();
                for (k, v) in map {
                    self.str(k);
                    self.json(v);
                }
                self.set_items();
            }
        }
    }
}
