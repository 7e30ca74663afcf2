//! Recognises pickled numpy uint8 ndarrays (the `data` entry of the CIFAR python batches) in
//! the symbolic tree of the shared restricted unpickler ([`crate::pickle`]).

use std::borrow::Cow;

use crate::pickle::{node_kind, Id, Node, Pickle};

/// A uint8 array extracted from the tree.
#[derive(Debug)]
pub struct U8Array {
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Pickle {
    /// Recognises a pickled numpy uint8 ndarray and returns its shape and bytes.
    ///
    /// Two patterns are understood:
    /// * protocols 2-4: `BUILD(REDUCE(numpy.core.multiarray._reconstruct, (numpy.ndarray, (0,), b'b')),
    ///   (version, shape, dtype, is_fortran, raw))`;
    /// * protocol 5: `REDUCE(numpy.core.numeric._frombuffer, (buffer, dtype, shape, order))`.
    ///
    /// (`numpy._core.*` module names of numpy 2 are accepted too.)
    pub fn u8_array(&self, id: Id) -> Result<U8Array, String> {
        match self.node(id) {
            Node::Build { obj, state } => self.reconstructed_array(*obj, *state),
            Node::Reduce { func, args }
                if self.is_global(
                    *func,
                    &["numpy.core.numeric", "numpy._core.numeric"],
                    "_frombuffer",
                ) =>
            {
                let Node::Tuple(a) = self.node(*args) else {
                    return Err("_frombuffer arguments are not a tuple".into());
                };
                let [buf, dtype, shape, order] = a[..] else {
                    return Err(format!("_frombuffer takes 4 arguments, found {}", a.len()));
                };
                self.check_dtype(dtype)?;
                let shape = self.shape(shape)?;
                let order = self.as_bytes(order).ok_or("array order is not a string")?;
                if &*order != b"C" {
                    return Err(format!(
                        "array is stored in order {:?}; only C (row-major) order is supported",
                        String::from_utf8_lossy(&order)
                    ));
                }
                let data = self
                    .as_bytes(buf)
                    .ok_or("array buffer is not bytes")?
                    .into_owned();
                finish_array(shape, data)
            }
            other => Err(format!(
                "expected a numpy ndarray, found a pickled {}",
                node_kind(other)
            )),
        }
    }

    fn reconstructed_array(&self, obj: Id, state: Id) -> Result<U8Array, String> {
        let Node::Reduce { func, args } = self.node(obj) else {
            return Err("expected numpy.core.multiarray._reconstruct(...) before BUILD".into());
        };
        if !self.is_global(
            *func,
            &["numpy.core.multiarray", "numpy._core.multiarray"],
            "_reconstruct",
        ) {
            return Err(format!(
                "expected numpy.core.multiarray._reconstruct, found {}",
                self.describe(*func)
            ));
        }
        let Node::Tuple(a) = self.node(*args) else {
            return Err("_reconstruct arguments are not a tuple".into());
        };
        if !a
            .first()
            .is_some_and(|&c| self.is_global(c, &["numpy"], "ndarray"))
        {
            return Err("_reconstruct does not build a numpy.ndarray".into());
        }
        let Node::Tuple(st) = self.node(state) else {
            return Err("ndarray state is not a tuple".into());
        };
        // (version, shape, dtype, is_fortran, raw) or, from old numpy, (shape, dtype, is_fortran, raw).
        let st = match st.len() {
            5 => &st[1..],
            4 => &st[..],
            n => return Err(format!("ndarray state has {n} items, expected 4 or 5")),
        };
        let shape = self.shape(st[0])?;
        self.check_dtype(st[1])?;
        match self.node(st[2]) {
            Node::Bool(false) | Node::Int(0) => {}
            Node::Bool(true) | Node::Int(_) => {
                return Err(
                    "array is stored in Fortran order; only C (row-major) order is supported"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "ndarray fortran flag is a {}, expected a bool",
                    node_kind(other)
                ))
            }
        }
        let data = self
            .as_bytes(st[3])
            .ok_or_else(|| {
                format!(
                    "ndarray data is a {}, expected bytes",
                    node_kind(self.node(st[3]))
                )
            })?
            .into_owned();
        finish_array(shape, data)
    }

    fn shape(&self, id: Id) -> Result<Vec<usize>, String> {
        let dims = self
            .int_list(id)
            .ok_or("array shape is not a tuple of ints")?;
        dims.iter()
            .map(|&d| usize::try_from(d).map_err(|_| format!("negative array dimension {d}")))
            .collect()
    }

    /// Accepts `numpy.dtype('u1', ...)` with byte order '|' (or none given).
    fn check_dtype(&self, id: Id) -> Result<(), String> {
        let (ctor, state) = match self.node(id) {
            Node::Build { obj, state } => (*obj, Some(*state)),
            _ => (id, None),
        };
        let Node::Reduce { func, args } = self.node(ctor) else {
            return Err("array dtype is not a pickled numpy.dtype".into());
        };
        if !self.is_global(*func, &["numpy"], "dtype") {
            return Err(format!(
                "array dtype is built by {}, expected numpy.dtype",
                self.describe(*func)
            ));
        }
        let Node::Tuple(a) = self.node(*args) else {
            return Err("numpy.dtype arguments are not a tuple".into());
        };
        let name = a.first().and_then(|&n| self.as_bytes(n));
        let name = name
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let order = state.and_then(|s| match self.node(s) {
            Node::Tuple(t) => t
                .get(1)
                .and_then(|&o| self.as_bytes(o))
                .map(|b| b.into_owned()),
            _ => None,
        });
        let order = order
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or(Cow::Borrowed("|"));
        if name != "u1" || order != "|" {
            return Err(format!(
                "array dtype is '{order}{name}', expected uint8 '|u1'"
            ));
        }
        Ok(())
    }
}

fn finish_array(shape: Vec<usize>, data: Vec<u8>) -> Result<U8Array, String> {
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or("array shape overflows")?;
    if expected != data.len() {
        return Err(format!(
            "array of shape {shape:?} needs {expected} bytes but its data holds {}",
            data.len()
        ));
    }
    Ok(U8Array { shape, data })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn p(bytes: &[u8]) -> Pickle {
        crate::pickle::parse(Path::new("mem.pkl"), bytes).unwrap()
    }

    #[test]
    fn fortran_order_rejected() {
        let mut w = crate_testutil::PickleWriter::new();
        w.u8_array(&[1, 2], &[1, 2], "u1");
        let mut bytes = w.finish();
        // The fortran flag is the last NEWFALSE before the data string.
        let pos = bytes.iter().rposition(|&b| b == 0x89).unwrap();
        bytes[pos] = 0x88;
        let t = p(&bytes);
        let err = t.u8_array(t.root).unwrap_err();
        assert!(err.contains("Fortran"), "{err}");
    }

    use super::super::testutil as crate_testutil;
}
