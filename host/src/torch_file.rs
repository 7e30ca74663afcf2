//! Files written by `torch.save`: a state dict, or a checkpoint dict holding one under `model`
//! (the reference's fvcore `Checkpointer`), read into named tensors without executing any pickle
//! code.
//!
//! The zip format (PyTorch >= 1.6) holds `<prefix>/data.pkl` (the pickled object) and
//! `<prefix>/data/<key>` (the raw storages). The pickle is decoded symbolically ([`crate::pickle`]); tensors are recognised as
//! `torch._utils._rebuild_tensor_v2(persistent_id(('storage', torch.<Dtype>Storage, key,
//! location, numel)), storage_offset, size, stride, ...)` (and `_rebuild_tensor_v3`,
//! `_rebuild_parameter`), and rebuilt from the storage bytes with their offset, size and stride.
//! The legacy format (`_use_new_zipfile_serialization=False`, the default before 1.6) is the
//! same pickle followed by the raw storages in one stream ([`read_legacy`]).
//!
//! Everything else in the file (optimizer state, scheduler, config, yacs `CfgNode`s) is left as
//! symbols and ignored.

use crate::pickle::{self, Id, Node, Pickle};
use anyhow::{anyhow, bail, Context, Result};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// What a checkpoint file is, judged by its first bytes (never by its extension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// safetensors: a little-endian u64 header length followed by a JSON object.
    Safetensors,
    /// A zip archive (`torch.save` since PyTorch 1.6).
    Zip,
    /// The legacy `torch.save` format (`_use_new_zipfile_serialization=False`): a pickled magic
    /// number followed by more pickles.
    LegacyTorch,
    Unknown,
}

/// The pickle `torch.save`'s legacy format starts with: protocol 2, then the LONG1
/// 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Tells the format of a weights file from its first bytes.
pub fn sniff(bytes: &[u8]) -> Format {
    if bytes.starts_with(b"PK\x03\x04") {
        return Format::Zip;
    }
    if bytes.starts_with(&LEGACY_MAGIC) {
        return Format::LegacyTorch;
    }
    if bytes.len() >= 9 {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if bytes[8] == b'{' && n >= 2 && n <= (bytes.len() - 8) as u64 {
            return Format::Safetensors;
        }
    }
    Format::Unknown
}

/// Tensors read from a `torch.save` file.
pub struct StateDict {
    /// Names and tensors (on the CPU) in the order of the file.
    pub tensors: Vec<(String, Tensor)>,
    /// The other entries of the checkpoint dict when the state dict came from its `model`
    /// entry (`optimizer`, `epoch`, ...), for the log; empty for a bare state dict.
    pub ignored: Vec<String>,
}

/// Reads the state dict in a `torch.save` file (`bytes`, read from `path`): the zip format or
/// the legacy one.
pub fn load_state_dict(path: &Path, bytes: &[u8]) -> Result<StateDict> {
    let r = match sniff(bytes) {
        Format::LegacyTorch => read_legacy(path, bytes),
        _ => read_zip(bytes),
    };
    r.with_context(|| format!("{}: cannot read this torch.save file", path.display()))
}

/// The zip container of a `torch.save` file, read with the `zip` crate (built without its
/// compression features: PyTorch stores every entry uncompressed, so a compressed entry is an
/// error, not something to decode). Entry CRCs are checked as each entry is read.
struct Zip<'a> {
    archive: zip::ZipArchive<std::io::Cursor<&'a [u8]>>,
    /// Entry names in central-directory order.
    names: Vec<String>,
    len: usize,
}

impl<'a> Zip<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self> {
        let archive = zip::ZipArchive::new(std::io::Cursor::new(bytes))
            .map_err(|e| anyhow!("not a readable zip archive ({e}): truncated or corrupt file?"))?;
        let names = archive.file_names().map(str::to_string).collect();
        Ok(Zip {
            archive,
            names,
            len: bytes.len(),
        })
    }

    fn names(&self) -> &[String] {
        &self.names
    }

    /// The bytes of entry `name`, `None` when there is none.
    fn read(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        let mut entry = match self.archive.by_name(name) {
            Ok(e) => e,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(zip::result::ZipError::UnsupportedArchive(why)) => bail!(
                "zip entry {name}: {why}; torch.save stores its entries uncompressed, so this \
                 file was repacked by another tool: load and re-save it with torch.save"
            ),
            Err(e) => bail!("zip entry {name}: {e} (truncated or corrupt file?)"),
        };
        if entry.encrypted() {
            bail!("zip entry {name} is encrypted; torch.save never encrypts");
        }
        // The declared size is untrusted: never reserve more than the whole file.
        let capacity = usize::try_from(entry.size()).map_or(0, |n| n.min(self.len));
        let mut data = Vec::with_capacity(capacity);
        entry
            .read_to_end(&mut data)
            .map_err(|e| anyhow!("zip entry {name}: {e} (truncated or corrupt file?)"))?;
        Ok(Some(data))
    }
}

fn read_zip(bytes: &[u8]) -> Result<StateDict> {
    let mut zip = Zip::new(bytes)?;
    let pkl_names: Vec<&String> = zip
        .names()
        .iter()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .collect();
    let prefix = match pkl_names[..] {
        [one] => one.trim_end_matches("data.pkl").to_string(),
        [] => bail!(
            "the zip archive has no <name>/data.pkl entry, so it was not written by torch.save \
             (entries: {})",
            preview(zip.names())
        ),
        _ => bail!(
            "the zip archive holds several pickles ({}); expected the one of torch.save",
            preview(&pkl_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        ),
    };
    if zip
        .names()
        .iter()
        .any(|n| n.starts_with(&format!("{prefix}code/")))
    {
        bail!(
            "this is a TorchScript archive (torch.jit.save), not a state dict: save \
             `model.state_dict()` with torch.save instead"
        );
    }
    if let Some(order) = zip.read(&format!("{prefix}byteorder"))? {
        match &order[..] {
            b"little" => {}
            b"big" => bail!(
                "the tensors were saved on a big-endian machine; only little-endian files are \
                 supported (load and re-save them on a little-endian machine, or convert to \
                 safetensors)"
            ),
            other => bail!(
                "unknown byteorder entry {:?}",
                String::from_utf8_lossy(other)
            ),
        }
    }
    let pkl_name = format!("{prefix}data.pkl");
    let pkl = zip
        .read(&pkl_name)?
        .ok_or_else(|| anyhow!("the archive lacks its {pkl_name}"))?;
    let tree = pickle::parse(Path::new(&pkl_name), &pkl)?;
    let storages = Storages {
        blobs: Blobs::Zip { zip, prefix },
        cache: HashMap::new(),
    };
    state_dict(&tree, storages)
}

/// The legacy format (`_use_new_zipfile_serialization=False`, the default before PyTorch 1.6):
/// pickles of the magic number, the protocol version (1001), the system info and the object,
/// then a pickled list of storage keys, then each storage as a little-endian u64 element count
/// followed by its bytes.
fn read_legacy(path: &Path, bytes: &[u8]) -> Result<StateDict> {
    // The magic number pickle (a 10-byte integer, which the pickle reader's i64 does not
    // hold) was recognised by `sniff`; it ends with STOP.
    if bytes.get(LEGACY_MAGIC.len()) != Some(&b'.') {
        bail!("the legacy magic number is not followed by the pickle STOP opcode");
    }
    let mut pos = LEGACY_MAGIC.len() + 1;
    let mut next = |what: &str| -> Result<Pickle> {
        let t = pickle::parse(path, &bytes[pos..]).with_context(|| {
            format!("the {what} pickle (at byte {pos} of the legacy torch.save format)")
        })?;
        pos += t.len;
        Ok(t)
    };
    let version = next("protocol version")?;
    if version.as_int(version.root) != Some(1001) {
        bail!(
            "legacy torch.save protocol version {}, expected 1001",
            what(&version, version.root)
        );
    }
    let info = next("system info")?;
    let little = dict_items(&info, info.root).and_then(|items| {
        items
            .iter()
            .find(|(k, _)| key_str(&info, *k).as_deref() == Some("little_endian"))
            .map(|&(_, v)| info.node(v) == &Node::Bool(true))
    });
    if little == Some(false) {
        bail!(
            "the tensors were saved on a big-endian machine; only little-endian files are \
             supported (load and re-save them on a little-endian machine, or convert to \
             safetensors)"
        );
    }
    let tree = next("object")?;
    let keys_tree = next("storage keys")?;
    let Node::List(key_ids) = keys_tree.node(keys_tree.root) else {
        bail!(
            "the storage key list is {}, expected a list",
            what(&keys_tree, keys_tree.root)
        );
    };
    // Element sizes of the storages, from the persistent ids in the object (the records after
    // the pickles only give element counts).
    let mut elt_sizes = HashMap::new();
    for node in &tree.nodes {
        let Node::PersId(pid) = node else { continue };
        let Node::Tuple(p) = tree.node(*pid) else {
            continue;
        };
        if let (Some(&ty), Some(key)) = (p.get(1), p.get(2).and_then(|&k| key_str(&tree, k))) {
            if let Node::Global { name, .. } = tree.node(ty) {
                elt_sizes.insert(key, storage_elt_size(name));
            }
        }
    }
    let mut blobs = HashMap::new();
    for &k in key_ids {
        let key = key_str(&keys_tree, k).context("a storage key is not a str")?;
        let elt = match elt_sizes.get(&key) {
            Some(Some(e)) => *e,
            Some(None) => bail!("storage {key} has a storage type imgclf does not know"),
            None => bail!("storage {key} is listed but nothing in the object refers to it"),
        };
        let header = bytes
            .get(pos..)
            .and_then(|rest| rest.get(..8))
            .with_context(|| format!("the file ends before storage {key} (truncated file?)"))?;
        let count = u64::from_le_bytes(header.try_into().unwrap());
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(elt))
            .with_context(|| format!("storage {key} has an invalid element count {count}"))?;
        let data = bytes[pos + 8..].get(..len).with_context(|| {
            format!(
                "storage {key} ({len} bytes at byte {}) is cut off by the end of the file \
                 ({} bytes; truncated file?)",
                pos + 8,
                bytes.len()
            )
        })?;
        blobs.insert(key, data);
        pos += 8 + len;
    }
    let storages = Storages {
        blobs: Blobs::Legacy(blobs),
        cache: HashMap::new(),
    };
    state_dict(&tree, storages)
}

/// The state dict in `tree`: the root dict, or its `model` entry.
fn state_dict(tree: &Pickle, mut storages: Storages) -> Result<StateDict> {
    let root = dict_items(tree, tree.root).ok_or_else(|| {
        anyhow!(
            "the file holds {}, not a state dict or a checkpoint dict with a 'model' entry \
             (a whole pickled module is not supported: save `model.state_dict()`)",
            what(tree, tree.root)
        )
    })?;
    // A checkpoint dict holds the state dict under 'model' (a state dict could only have a
    // 'model' key for a tensor, which is not dict-like).
    let model = root
        .iter()
        .rev()
        .find(|(k, _)| key_str(tree, *k).as_deref() == Some("model"))
        .and_then(|&(_, v)| dict_items(tree, v));
    let (items, ignored) = match model {
        Some(items) => {
            let others = root
                .iter()
                .filter_map(|&(k, _)| key_str(tree, k))
                .filter(|k| k != "model")
                .collect();
            (items, others)
        }
        None => (root, Vec::new()),
    };
    let mut tensors = Vec::with_capacity(items.len());
    for (k, v) in items {
        let name = key_str(tree, k)
            .ok_or_else(|| anyhow!("a state dict key is {}, not a str", what(tree, k)))?;
        let t =
            tensor(tree, v, &mut storages).with_context(|| format!("state dict entry '{name}'"))?;
        tensors.push((name, t));
    }
    Ok(StateDict { tensors, ignored })
}

/// The first few names, for messages.
fn preview(names: &[String]) -> String {
    let mut s = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        s += &format!(", ... ({} in all)", names.len());
    }
    s
}

/// A description of a node for messages: `a dict`, `an object of foo.Bar`, ...
fn what(t: &Pickle, id: Id) -> String {
    match t.node(unwrap(t, id)) {
        Node::Reduce { func, .. } | Node::NewObj { cls: func, .. } => {
            format!("an object built by {}", t.describe(*func))
        }
        other => {
            let kind = pickle::node_kind(other);
            let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                "an"
            } else {
                "a"
            };
            format!("{article} {kind}")
        }
    }
}

/// The object under any BUILD / SETITEMS / APPENDS wrappers (iteratively: a crafted file cannot
/// exhaust the stack; each wrapper points at an older node, so this ends).
fn unwrap(t: &Pickle, mut id: Id) -> Id {
    while let Node::Build { obj, .. } | Node::SetItems { obj, .. } | Node::Appends { obj, .. } =
        t.node(id)
    {
        id = *obj;
    }
    id
}

fn key_str(t: &Pickle, id: Id) -> Option<String> {
    match t.node(id) {
        Node::Str(s) => Some(s.clone()),
        Node::Bytes(b) => String::from_utf8(b.clone()).ok(),
        _ => None,
    }
}

/// The items of a dict-like node: a dict, `collections.OrderedDict()` filled by SETITEMS (and
/// its `_metadata` state from BUILD, ignored), or a dict subclass (yacs `CfgNode`) rebuilt by
/// NEWOBJ / REDUCE and filled the same way.
fn dict_items(t: &Pickle, mut id: Id) -> Option<Vec<(Id, Id)>> {
    // Items set on the object, outermost (latest) wrapper first.
    let mut later: Vec<&[(Id, Id)]> = Vec::new();
    let mut base = loop {
        match t.node(id) {
            Node::Dict(items) => break items.clone(),
            Node::Build { obj, .. } => id = *obj,
            // Any object that received SETITEMS is dict-like (OrderedDict, a dict subclass).
            Node::SetItems { obj, items } => {
                later.push(items);
                id = *obj;
            }
            // An empty OrderedDict, before any SETITEMS.
            Node::Reduce { func, .. } if t.is_global(*func, &["collections"], "OrderedDict") => {
                break Vec::new()
            }
            _ if !later.is_empty() => break Vec::new(),
            _ => return None,
        }
    };
    for items in later.into_iter().rev() {
        base.extend_from_slice(items);
    }
    Some(base)
}

/// Where the raw storages are.
enum Blobs<'a> {
    /// `<prefix>data/<key>` entries of the zip archive.
    Zip { zip: Zip<'a>, prefix: String },
    /// The records after the pickles of the legacy format, by key.
    Legacy(HashMap<String, &'a [u8]>),
}

/// Storage blobs, each turned into a flat CPU tensor once (tensors that share a storage are
/// views of it).
struct Storages<'a> {
    blobs: Blobs<'a>,
    cache: HashMap<String, (Tensor, i64)>,
}

impl Storages<'_> {
    /// The storage `key` as a flat tensor of `kind`, and its element count.
    fn get(&mut self, key: &str, kind: Kind, numel: i64) -> Result<(Tensor, i64)> {
        if let Some((t, n)) = self.cache.get(key) {
            if t.kind() != kind {
                bail!(
                    "storage {key} is read as {:?} and as {kind:?}; one storage viewed with two \
                     dtypes is not supported",
                    t.kind()
                );
            }
            return Ok((t.shallow_clone(), *n));
        }
        let (name, data): (String, Cow<[u8]>) =
            match &mut self.blobs {
                Blobs::Zip { zip, prefix } => {
                    let name = format!("storage entry {prefix}data/{key}");
                    let data = zip
                        .read(&format!("{prefix}data/{key}"))?
                        .ok_or_else(|| anyhow!("the archive lacks the {name}"))?;
                    (name, Cow::Owned(data))
                }
                Blobs::Legacy(blobs) => (
                    format!("storage {key}"),
                    Cow::Borrowed(*blobs.get(key).ok_or_else(|| {
                        anyhow!("storage {key} is not in the file's storage list")
                    })?),
                ),
            };
        let elt = kind.elt_size_in_bytes();
        let expected = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(elt))
            .ok_or_else(|| anyhow!("storage {key} has an invalid element count {numel}"))?;
        if data.len() != expected {
            bail!(
                "{name} holds {} bytes, but {numel} elements of {kind:?} need \
                 {expected} (corrupt file?)",
                data.len()
            );
        }
        let t = Tensor::f_from_data_size(&data, &[numel], kind)?;
        self.cache
            .insert(key.to_string(), (t.shallow_clone(), numel));
        Ok((t, numel))
    }
}

/// `torch.<Name>Storage` (typed storages, as `_rebuild_tensor_v2` receives them).
fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// Bytes per element of `torch.<Name>Storage`, for skipping over storages in the legacy format
/// (the complex ones included, though they cannot be loaded).
fn storage_elt_size(name: &str) -> Option<usize> {
    match name {
        "ComplexFloatStorage" => Some(8),
        "ComplexDoubleStorage" => Some(16),
        "UntypedStorage" => Some(1),
        _ => storage_kind(name).map(|k| k.elt_size_in_bytes()),
    }
}

/// `torch.<dtype>` (the dtype argument of `_rebuild_tensor_v3`).
fn dtype_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "float32" | "float" => Kind::Float,
        "float64" | "double" => Kind::Double,
        "float16" | "half" => Kind::Half,
        "bfloat16" => Kind::BFloat16,
        "int64" | "long" => Kind::Int64,
        "int32" | "int" => Kind::Int,
        "int16" | "short" => Kind::Int16,
        "int8" => Kind::Int8,
        "uint8" => Kind::Uint8,
        "bool" => Kind::Bool,
        _ => return None,
    })
}

const SUPPORTED: &str =
    "float32, float64, float16, bfloat16, int64, int32, int16, int8, uint8, bool";

fn args(t: &Pickle, id: Id) -> Result<&[Id]> {
    match t.node(id) {
        Node::Tuple(a) => Ok(a),
        other => bail!(
            "arguments are a {}, expected a tuple",
            pickle::node_kind(other)
        ),
    }
}

fn int_arg(t: &Pickle, id: Id, what: &str) -> Result<i64> {
    t.as_int(id).ok_or_else(|| {
        anyhow!(
            "{what} is a {}, expected an int",
            pickle::node_kind(t.node(id))
        )
    })
}

/// Rebuilds the tensor pickled at `id`.
fn tensor(t: &Pickle, id: Id, storages: &mut Storages) -> Result<Tensor> {
    tensor_at(t, id, storages, 0)
}

/// Parameters and tensor subclasses wrap the plain tensor; deeper nesting than this is no
/// file PyTorch writes.
const MAX_WRAPPING: usize = 8;

fn tensor_at(t: &Pickle, id: Id, storages: &mut Storages, depth: usize) -> Result<Tensor> {
    // BUILD: a Parameter pickled with its state (`_rebuild_parameter_with_state`), or any
    // tensor that gained attributes: the state is ignored.
    match t.node(unwrap(t, id)) {
        Node::Reduce { func, args } => rebuild(t, *func, *args, storages, depth),
        _ => bail!("is {}, not a tensor", what(t, id)),
    }
}

fn rebuild(
    t: &Pickle,
    func: Id,
    args_id: Id,
    storages: &mut Storages,
    depth: usize,
) -> Result<Tensor> {
    if depth > MAX_WRAPPING {
        bail!("tensor is wrapped more than {MAX_WRAPPING} levels deep");
    }
    let a = args(t, args_id)?;
    let torch_utils = &["torch._utils"];
    if t.is_global(func, torch_utils, "_rebuild_parameter")
        || t.is_global(func, torch_utils, "_rebuild_parameter_with_state")
    {
        let data = *a.first().context("_rebuild_parameter without arguments")?;
        return tensor_at(t, data, storages, depth + 1);
    }
    if t.is_global(func, &["torch._tensor"], "_rebuild_from_type_v2") {
        // (func, new_type, args, state): a tensor subclass; rebuild the plain tensor.
        let [f, _ty, inner, _state] = a[..] else {
            bail!("_rebuild_from_type_v2 takes 4 arguments, found {}", a.len());
        };
        return rebuild(t, f, inner, storages, depth + 1);
    }
    let v3 = t.is_global(func, torch_utils, "_rebuild_tensor_v3");
    if !v3 && !t.is_global(func, torch_utils, "_rebuild_tensor_v2") {
        bail!(
            "is built by {}; only dense tensors (torch._utils._rebuild_tensor_v2) are supported",
            t.describe(func)
        );
    }
    let needed = if v3 { 7 } else { 6 };
    if a.len() < needed {
        bail!(
            "{} takes at least {needed} arguments, found {}",
            t.describe(func),
            a.len()
        );
    }
    // The persistent id: ('storage', storage_type, key, location, numel), and in the legacy
    // format a sixth item, the view metadata (None since PyTorch 1.0's storage views went).
    let Node::PersId(pid) = t.node(a[0]) else {
        bail!(
            "the storage argument is {}, expected a persistent id",
            what(t, a[0])
        );
    };
    let pid = args(t, *pid).context("persistent id")?;
    let (tag, storage_type, key, numel) = match pid[..] {
        [tag, ty, key, _location, numel] => (tag, ty, key, numel),
        [tag, ty, key, _location, numel, view] => {
            if t.node(view) != &Node::None {
                bail!(
                    "is a view of a storage (saved by an old PyTorch); load and re-save the file \
                     with a recent PyTorch, or convert it to safetensors"
                );
            }
            (tag, ty, key, numel)
        }
        _ => bail!("persistent id has {} items, expected 5 or 6", pid.len()),
    };
    if key_str(t, tag).as_deref() != Some("storage") {
        bail!("persistent id is not a ('storage', ...) record");
    }
    let key = key_str(t, key).context("storage key is not a str")?;
    let numel = int_arg(t, numel, "storage size")?;
    let Node::Global { module, name } = t.node(storage_type) else {
        bail!(
            "storage type is {}, expected a torch storage class",
            what(t, storage_type)
        );
    };
    let kind = if v3 {
        // An untyped storage (numel counts bytes) and the dtype as a separate argument.
        let Node::Global { module: m, name: d } = t.node(a[6]) else {
            bail!(
                "dtype argument is {}, expected torch.<dtype>",
                what(t, a[6])
            );
        };
        match (m.as_str(), dtype_kind(d)) {
            ("torch", Some(k)) => k,
            _ => bail!("unsupported dtype {m}.{d} (supported: {SUPPORTED})"),
        }
    } else {
        match (module.as_str(), storage_kind(name)) {
            ("torch", Some(k)) => k,
            _ => bail!("unsupported storage type {module}.{name} (supported dtypes: {SUPPORTED})"),
        }
    };
    let (base, n) = if name == "UntypedStorage" {
        let elt = kind.elt_size_in_bytes() as i64;
        if numel % elt != 0 {
            bail!("untyped storage of {numel} bytes is not a whole number of {kind:?} elements");
        }
        storages.get(&key, kind, numel / elt)?
    } else {
        storages.get(&key, kind, numel)?
    };
    let offset = int_arg(t, a[1], "storage offset")?;
    let size = t.int_list(a[2]).context("size is not a tuple of ints")?;
    let stride = t.int_list(a[3]).context("stride is not a tuple of ints")?;
    if size.len() != stride.len() {
        bail!("size {size:?} and stride {stride:?} have different lengths");
    }
    if offset < 0 || size.iter().chain(&stride).any(|&v| v < 0) {
        bail!("negative storage offset, size or stride ({offset}, {size:?}, {stride:?})");
    }
    if size.iter().all(|&s| s > 0) {
        let last = size.iter().zip(&stride).try_fold(offset, |acc, (&s, &st)| {
            acc.checked_add((s - 1).checked_mul(st)?)
        });
        if last.is_none_or(|l| l >= n) {
            bail!(
                "size {size:?}, stride {stride:?} and offset {offset} reach past the end of \
                 storage {key} ({n} elements)"
            );
        }
    }
    Ok(base
        .f_as_strided(&size, &stride, Some(offset))?
        .f_contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A zip archive of stored entries, as torch.save writes them (zip64 records when `zip64`).
    fn write_zip(entries: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(zip64);
        for (name, data) in entries {
            w.start_file(*name, options).unwrap();
            w.write_all(data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    /// Written by `tests/data/torch_save/make_fixtures.py` (PyTorch 2.11): the reference's
    /// checkpoint layout with a yacs CfgNode config and an optimizer holding tensors.
    const CHECKPOINT: &[u8] = include_bytes!("../../tests/data/torch_save/checkpoint.pth");
    /// The same, saved with `_use_new_zipfile_serialization=False`.
    const LEGACY: &[u8] = include_bytes!("../../tests/data/torch_save/checkpoint_legacy.pth");

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn err(bytes: &[u8]) -> String {
        let e = load_state_dict(Path::new("w.pth"), bytes)
            .err()
            .expect("an error");
        format!("{e:#}")
    }

    #[test]
    fn reads_every_tensor_of_a_reference_style_checkpoint_zip_and_legacy() {
        assert_eq!(sniff(CHECKPOINT), Format::Zip);
        assert_eq!(sniff(LEGACY), Format::LegacyTorch);
        for bytes in [CHECKPOINT, LEGACY] {
            check_checkpoint_fixture(bytes);
        }
    }

    fn check_checkpoint_fixture(bytes: &[u8]) {
        let sd = load_state_dict(Path::new("checkpoint.pth"), bytes).unwrap();
        assert_eq!(
            sd.ignored,
            ["optimizer", "scheduler", "epoch", "global_step", "config"]
        );
        let get = |name: &str| {
            let (_, t) = sd.tensors.iter().find(|(n, _)| n == name).unwrap();
            (t.kind(), t.size(), values(t))
        };
        let names: Vec<&str> = sd.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "0.weight",
                "0.bias",
                "1.weight",
                "1.bias",
                "1.running_mean",
                "1.running_var",
                "1.num_batches_tracked",
                "base",
                "base_t",
                "row",
                "scalar",
                "empty",
                "half",
                "bf16",
                "f64",
                "i32",
                "u8",
                "flag",
                "param"
            ]
        );
        use Kind::*;
        assert_eq!(get("0.weight"), (Float, vec![2, 1, 1, 1], vec![1.0, -2.0]));
        assert_eq!(get("0.bias"), (Float, vec![2], vec![0.5, 0.25]));
        assert_eq!(get("1.running_mean"), (Float, vec![2], vec![0.125, -0.125]));
        assert_eq!(get("1.num_batches_tracked"), (Int64, vec![], vec![7.0]));
        let r = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(get("base"), (Float, vec![2, 3], r.to_vec()));
        // A transposed view (stride (1, 3)) and a view at storage offset 3 of the same storage.
        assert_eq!(
            get("base_t"),
            (Float, vec![3, 2], vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0])
        );
        assert_eq!(get("row"), (Float, vec![3], vec![3.0, 4.0, 5.0]));
        assert_eq!(get("scalar"), (Float, vec![], vec![3.25]));
        assert_eq!(get("empty"), (Float, vec![0, 3], vec![]));
        assert_eq!(get("half"), (Half, vec![2], vec![0.5, -2.0]));
        assert_eq!(get("bf16"), (BFloat16, vec![2], vec![1.5, -0.25]));
        assert_eq!(get("f64"), (Double, vec![1], vec![0.1]));
        assert_eq!(get("i32"), (Int, vec![2], vec![-7.0, 9.0]));
        assert_eq!(get("u8"), (Uint8, vec![2], vec![0.0, 255.0]));
        assert_eq!(get("flag"), (Bool, vec![2], vec![1.0, 0.0]));
        // An nn.Parameter (torch._utils._rebuild_parameter around the tensor).
        assert_eq!(get("param"), (Float, vec![1], vec![2.5]));
    }

    /// A protocol-2 pickle of `{'w': _rebuild_tensor_v2(persistent_id(('storage',
    /// torch.<storage>, '0', 'cpu', numel)), offset, size, stride, False, OrderedDict())}`.
    fn tensor_pickle(storage: &str, numel: u8, offset: u8, size: &[u8], stride: &[u8]) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, v: &str| {
            b.push(b'X');
            b.extend_from_slice(&(v.len() as u32).to_le_bytes());
            b.extend_from_slice(v.as_bytes());
        };
        let ints = |b: &mut Vec<u8>, v: &[u8]| {
            b.push(b'(');
            for &i in v {
                b.extend_from_slice(&[b'K', i]);
            }
            b.push(b't');
        };
        let mut b = vec![0x80, 2, b'}'];
        s(&mut b, "w");
        b.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        s(&mut b, "storage");
        b.extend_from_slice(format!("ctorch\n{storage}\n").as_bytes());
        s(&mut b, "0");
        s(&mut b, "cpu");
        b.extend_from_slice(&[b'K', numel, b't', b'Q', b'K', offset]);
        ints(&mut b, size);
        ints(&mut b, stride);
        b.extend_from_slice(b"\x89ccollections\nOrderedDict\n)Rt");
        b.extend_from_slice(b"Rs.");
        b
    }

    fn archive(pkl: &[u8], order: &[u8], blob: &[u8]) -> Vec<u8> {
        write_zip(
            &[
                ("w/data.pkl", pkl),
                ("w/byteorder", order),
                ("w/data/0", blob),
            ],
            true,
        )
    }

    #[test]
    fn hand_built_archive_with_strides() {
        let blob: Vec<u8> = (0..6).flat_map(|i| (i as i64 * 10).to_le_bytes()).collect();
        // A 2x2 view at offset 1 with strides (1, 2) of [0, 10, 20, 30, 40, 50].
        let z = archive(
            &tensor_pickle("LongStorage", 6, 1, &[2, 2], &[1, 2]),
            b"little",
            &blob,
        );
        let sd = load_state_dict(Path::new("w.pth"), &z).unwrap();
        assert!(sd.ignored.is_empty());
        let (name, t) = &sd.tensors[0];
        assert_eq!(name, "w");
        assert_eq!((t.kind(), t.size()), (Kind::Int64, vec![2, 2]));
        assert_eq!(values(t), [10.0, 30.0, 20.0, 40.0]);
    }

    #[test]
    fn unreadable_content_is_a_clear_error() {
        let blob = [0u8; 24];
        let ok = tensor_pickle("FloatStorage", 6, 0, &[2, 3], &[3, 1]);
        let e = err(&archive(&ok, b"big", &blob));
        assert!(e.contains("w.pth") && e.contains("big-endian"), "{e}");
        let e = err(&archive(
            &tensor_pickle("ComplexFloatStorage", 6, 0, &[6], &[1]),
            b"little",
            &blob,
        ));
        assert!(
            e.contains("'w'") && e.contains("torch.ComplexFloatStorage") && e.contains("bfloat16"),
            "{e}"
        );
        let e = err(&archive(
            &tensor_pickle("FloatStorage", 6, 1, &[2, 3], &[3, 1]),
            b"little",
            &blob,
        ));
        assert!(e.contains("reach past the end of storage 0"), "{e}");
        let e = err(&archive(
            &tensor_pickle("FloatStorage", 7, 0, &[7], &[1]),
            b"little",
            &blob,
        ));
        assert!(
            e.contains("w/data/0 holds 24 bytes") && e.contains("28"),
            "{e}"
        );
        let e = err(&write_zip(&[("w/data.pkl", &ok)], false));
        assert!(e.contains("lacks the storage entry w/data/0"), "{e}");

        // Not a state dict: a list, and a whole pickled module.
        let e = err(&archive(b"\x80\x02]q\x00.", b"little", &blob));
        assert!(e.contains("a list, not a state dict"), "{e}");
        let module = b"\x80\x02cmymodel\nNet\nq\x00)\x81}b.";
        let e = err(&archive(module, b"little", &blob));
        assert!(
            e.contains("mymodel.Net") && e.contains("state_dict()"),
            "{e}"
        );
        let e = err(&write_zip(
            &[("w/data.pkl", &ok), ("w/code/__torch__.py", b"")],
            false,
        ));
        assert!(e.contains("TorchScript"), "{e}");
        let e = err(&write_zip(&[("weights.bin", &blob)], false));
        assert!(
            e.contains("no <name>/data.pkl") && e.contains("weights.bin"),
            "{e}"
        );

        // Truncated: the end of the archive is gone.
        let e = err(&CHECKPOINT[..CHECKPOINT.len() - 100]);
        assert!(e.contains("w.pth") && e.contains("truncated"), "{e}");
    }

    #[test]
    fn damaged_zip_containers_are_clear_errors() {
        let blob = [7u8; 24];
        let ok = tensor_pickle("FloatStorage", 6, 0, &[2, 3], &[3, 1]);
        for zip64 in [false, true] {
            let z = write_zip(&[("w/data.pkl", &ok), ("w/data/0", &blob)], zip64);
            assert_eq!(
                load_state_dict(Path::new("w.pth"), &z)
                    .unwrap()
                    .tensors
                    .len(),
                1
            );
            // Cut anywhere: the end records are gone.
            for cut in [4, 10, z.len() / 2, z.len() - 1] {
                let e = err(&z[..cut]);
                assert!(
                    e.contains("w.pth") && e.contains("truncated"),
                    "cut at {cut}: {e}"
                );
            }
        }
        let z = write_zip(&[("w/data.pkl", &ok), ("w/data/0", &blob)], false);
        // A flipped data byte fails the entry's CRC.
        let mut bad = z.clone();
        let at = bad.windows(24).position(|w| w == blob).unwrap();
        bad[at] = 8;
        let e = err(&bad);
        assert!(e.contains("w/data/0") && e.contains("checksum"), "{e}");
        // A deflated entry (method 8 in its local and central headers) is refused with the fix.
        let mut deflated = z.clone();
        for sig in [[0x50, 0x4b, 0x03, 0x04], [0x50, 0x4b, 0x01, 0x02]] {
            let offset = if sig[2] == 3 { 8 } else { 10 };
            let positions: Vec<usize> = deflated
                .windows(4)
                .enumerate()
                .filter(|(_, w)| *w == sig)
                .map(|(i, _)| i)
                .collect();
            for p in positions {
                deflated[p + offset] = 8;
            }
        }
        let e = err(&deflated);
        assert!(e.contains("w/data.pkl") && e.contains("re-save"), "{e}");
    }

    #[test]
    fn legacy_format_errors() {
        // Truncated inside the last storage record, and inside the object pickle.
        let e = err(&LEGACY[..LEGACY.len() - 2]);
        assert!(e.contains("w.pth") && e.contains("truncated"), "{e}");
        let e = err(&LEGACY[..LEGACY.len() / 2]);
        assert!(
            e.contains("object pickle") && e.contains("truncated"),
            "{e}"
        );
        // The system info says big-endian.
        let mut big = LEGACY.to_vec();
        let at = big.windows(13).position(|w| w == b"little_endian").unwrap();
        let flag = at + big[at..].iter().position(|&b| b == 0x88).unwrap();
        big[flag] = 0x89;
        let e = err(&big);
        assert!(e.contains("big-endian"), "{e}");
    }

    #[test]
    fn formats_are_told_by_content() {
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}");
        assert_eq!(sniff(&st), Format::Safetensors);
        assert_eq!(sniff(b"\x80\x02}."), Format::Unknown);
        assert_eq!(sniff(b""), Format::Unknown);
    }
}
