//! Safe wrappers over the c10d shim (`host/cpp/c10d.cpp`): libtorch's `TCPStore`,
//! `PrefixStore`, `ProcessGroupGloo` / `ProcessGroupNCCL` and their in-place collectives on
//! `tch::Tensor`s. Every C++ exception comes back as an error; nothing aborts.

use std::ffi::{c_char, c_void, CStr, CString};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tch::Tensor;

mod sys {
    use std::ffi::{c_char, c_void};
    extern "C" {
        pub fn imgclf_c10d_free_string(s: *mut c_char);
        pub fn imgclf_c10d_has_nccl() -> bool;
        pub fn imgclf_c10d_tcp_store(
            host: *const c_char,
            port: u16,
            is_server: bool,
            world_size: i64,
            wait_workers: bool,
            timeout_ms: i64,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn imgclf_c10d_prefix_store(
            prefix: *const c_char,
            base: *mut c_void,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn imgclf_c10d_store_free(store: *mut c_void);
        pub fn imgclf_c10d_store_set(
            store: *mut c_void,
            key: *const c_char,
            value: *const u8,
            len: usize,
        ) -> *mut c_char;
        pub fn imgclf_c10d_store_get(
            store: *mut c_void,
            key: *const c_char,
            value: *mut *mut u8,
            len: *mut usize,
        ) -> *mut c_char;
        pub fn imgclf_c10d_store_check(
            store: *mut c_void,
            key: *const c_char,
            present: *mut bool,
        ) -> *mut c_char;
        pub fn imgclf_c10d_store_add(
            store: *mut c_void,
            key: *const c_char,
            delta: i64,
            value: *mut i64,
        ) -> *mut c_char;
        pub fn imgclf_c10d_gloo(
            store: *mut c_void,
            rank: i32,
            size: i32,
            hostname: *const c_char,
            timeout_ms: i64,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn imgclf_c10d_nccl(
            store: *mut c_void,
            rank: i32,
            size: i32,
            device: i32,
            timeout_ms: i64,
            out: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn imgclf_c10d_group_free(group: *mut c_void);
        pub fn imgclf_c10d_allreduce(
            group: *mut c_void,
            tensor: *mut c_void,
            op: i32,
            work: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn imgclf_c10d_broadcast(
            group: *mut c_void,
            tensor: *mut c_void,
            root: i32,
            work: *mut *mut c_void,
        ) -> *mut c_char;
        pub fn imgclf_c10d_barrier(group: *mut c_void, work: *mut *mut c_void) -> *mut c_char;
        pub fn imgclf_c10d_work_wait(work: *mut c_void, timeout_ms: i64) -> *mut c_char;
        pub fn imgclf_c10d_work_free(work: *mut c_void);
        pub fn imgclf_c10d_sync_batch_norm(group: *mut c_void) -> *mut c_char;
    }
}

/// Turns the shim's returned message (NULL: success) into a `Result`.
fn check(err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-NULL return is a NUL-terminated malloc'd string the shim hands over.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .trim()
        .to_owned();
    unsafe { sys::imgclf_c10d_free_string(err) };
    Err(anyhow!(msg))
}

fn cstr(s: &str) -> Result<CString> {
    CString::new(s).with_context(|| format!("{s:?} contains a NUL byte"))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Whether this build compiled ProcessGroupNCCL in (it needs the wheel's nccl.h at build time).
pub fn has_nccl() -> bool {
    // SAFETY: no arguments, no state.
    unsafe { sys::imgclf_c10d_has_nccl() }
}

/// A c10d key-value store (`TCPStore`, or a `PrefixStore` over one). Thread-safe.
pub struct Store {
    raw: *mut c_void,
}

// SAFETY: c10d stores serialise their own operations (TCPStore holds a lock per operation).
unsafe impl Send for Store {}
unsafe impl Sync for Store {}

impl Store {
    /// A `TCPStore` on `host:port`: the server (waiting for `world_size` clients when
    /// `wait_workers`) or a client that retries until `timeout`.
    pub fn tcp(
        host: &str,
        port: u16,
        is_server: bool,
        world_size: Option<usize>,
        wait_workers: bool,
        timeout: Duration,
    ) -> Result<Store> {
        let h = cstr(host)?;
        let mut raw = std::ptr::null_mut();
        let n = world_size.map_or(-1, |n| n as i64);
        // SAFETY: valid C string and out-pointer; the shim owns the store behind `raw`.
        check(unsafe {
            sys::imgclf_c10d_tcp_store(
                h.as_ptr(),
                port,
                is_server,
                n,
                wait_workers,
                millis(timeout),
                &mut raw,
            )
        })
        .with_context(|| {
            let role = if is_server {
                "serving"
            } else {
                "connecting to"
            };
            format!("{role} the c10d TCPStore at {host}:{port}")
        })?;
        Ok(Store { raw })
    }

    /// The same store with every key prefixed by `prefix`.
    pub fn prefixed(&self, prefix: &str) -> Result<Store> {
        let p = cstr(prefix)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `self.raw` is a live store; the new one holds its own reference to it.
        check(unsafe { sys::imgclf_c10d_prefix_store(p.as_ptr(), self.raw, &mut raw) })?;
        Ok(Store { raw })
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let k = cstr(key)?;
        // SAFETY: live store, valid key and byte slice.
        check(unsafe {
            sys::imgclf_c10d_store_set(self.raw, k.as_ptr(), value.as_ptr(), value.len())
        })
        .with_context(|| format!("setting {key:?} in the c10d store"))
    }

    /// The value of `key`, waiting for it up to the store's timeout.
    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        let k = cstr(key)?;
        let mut ptr = std::ptr::null_mut();
        let mut len = 0usize;
        // SAFETY: live store; on success `ptr` is a malloc'd buffer of `len` bytes we free.
        check(unsafe { sys::imgclf_c10d_store_get(self.raw, k.as_ptr(), &mut ptr, &mut len) })
            .with_context(|| format!("reading {key:?} from the c10d store"))?;
        let v = unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec();
        unsafe { sys::imgclf_c10d_free_string(ptr.cast()) };
        Ok(v)
    }

    /// Whether `key` is set (does not wait).
    pub fn contains(&self, key: &str) -> Result<bool> {
        let k = cstr(key)?;
        let mut present = false;
        // SAFETY: live store, valid key and out-pointer.
        check(unsafe { sys::imgclf_c10d_store_check(self.raw, k.as_ptr(), &mut present) })
            .with_context(|| format!("checking {key:?} in the c10d store"))?;
        Ok(present)
    }

    /// Adds `delta` to the integer counter `key` (0 when unset) and returns the new value.
    pub fn add(&self, key: &str, delta: i64) -> Result<i64> {
        let k = cstr(key)?;
        let mut v = 0;
        // SAFETY: live store, valid key and out-pointer.
        check(unsafe { sys::imgclf_c10d_store_add(self.raw, k.as_ptr(), delta, &mut v) })
            .with_context(|| format!("adding to {key:?} in the c10d store"))?;
        Ok(v)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is dropped once.
        unsafe { sys::imgclf_c10d_store_free(self.raw) }
    }
}

/// The reduction of an all-reduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum = 0,
    Avg = 1,
    Max = 2,
    Min = 3,
}

/// A c10d process group (one backend).
pub struct ProcessGroup {
    raw: *mut c_void,
    rank: usize,
    size: usize,
    timeout: Duration,
}

// SAFETY: c10d backends are used from one thread at a time here (the trainer's), and their
// own worker threads are internal; moving the handle between threads is fine.
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// `ProcessGroupGloo` (CPU tensors) with its transport bound to `hostname`.
    pub fn gloo(
        store: &Store,
        rank: usize,
        size: usize,
        hostname: &str,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        let h = cstr(hostname)?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live store; the group keeps its own reference to it.
        check(unsafe {
            sys::imgclf_c10d_gloo(
                store.raw,
                rank as i32,
                size as i32,
                h.as_ptr(),
                millis(timeout),
                &mut raw,
            )
        })
        .with_context(|| format!("creating the Gloo process group (rank {rank} of {size})"))?;
        Ok(ProcessGroup {
            raw,
            rank,
            size,
            timeout,
        })
    }

    /// `ProcessGroupNCCL` on CUDA device `device`.
    pub fn nccl(
        store: &Store,
        rank: usize,
        size: usize,
        device: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: live store; the group keeps its own reference to it.
        check(unsafe {
            sys::imgclf_c10d_nccl(
                store.raw,
                rank as i32,
                size as i32,
                device as i32,
                millis(timeout),
                &mut raw,
            )
        })
        .with_context(|| {
            format!("creating the NCCL process group (rank {rank} of {size}, cuda:{device})")
        })?;
        Ok(ProcessGroup {
            raw,
            rank,
            size,
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn work(
        &self,
        what: &str,
        start: impl FnOnce(*mut *mut c_void) -> *mut c_char,
    ) -> Result<Work> {
        let mut raw = std::ptr::null_mut();
        check(start(&mut raw)).with_context(|| format!("starting {what}"))?;
        Ok(Work {
            raw,
            timeout: self.timeout,
            what: what.to_owned(),
        })
    }

    /// Starts an in-place all-reduce of `t` (contiguous, same shape on every rank).
    pub fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<Work> {
        if !t.is_contiguous() {
            bail!("all-reduce needs a contiguous tensor");
        }
        // A second handle on the same storage: the shim copies the at::Tensor (refcounted) and
        // writes the result in place.
        let mut handle = t.shallow_clone();
        let ptr = handle.as_mut_ptr().cast::<c_void>();
        // SAFETY: live group and a live at::Tensor behind `ptr`.
        self.work("an all-reduce", |out| unsafe {
            sys::imgclf_c10d_allreduce(self.raw, ptr, op as i32, out)
        })
    }

    /// Starts an in-place broadcast of `t` from `root`.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<Work> {
        if !t.is_contiguous() {
            bail!("broadcast needs a contiguous tensor");
        }
        let mut handle = t.shallow_clone();
        let ptr = handle.as_mut_ptr().cast::<c_void>();
        // SAFETY: as in all_reduce.
        self.work("a broadcast", |out| unsafe {
            sys::imgclf_c10d_broadcast(self.raw, ptr, root as i32, out)
        })
    }

    pub fn barrier(&self) -> Result<Work> {
        // SAFETY: live group.
        self.work("a barrier", |out| unsafe {
            sys::imgclf_c10d_barrier(self.raw, out)
        })
    }

    /// Makes training-mode `batch_norm` in this process reduce its batch statistics over this
    /// group (SyncBatchNorm for every model), or stops it (`on` false).
    pub fn sync_batch_norm(&self, on: bool) -> Result<()> {
        let g = if on { self.raw } else { std::ptr::null_mut() };
        // SAFETY: live group (the shim drops its reference when the group is freed).
        check(unsafe { sys::imgclf_c10d_sync_batch_norm(g) }).context("installing SyncBatchNorm")
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is dropped once.
        unsafe { sys::imgclf_c10d_group_free(self.raw) }
    }
}

/// A started collective.
pub struct Work {
    raw: *mut c_void,
    timeout: Duration,
    what: String,
}

// SAFETY: c10d work handles are waited on from any thread.
unsafe impl Send for Work {}

impl Work {
    /// Waits until the collective completes (errors: a peer died, the timeout passed, ...).
    pub fn wait(self) -> Result<()> {
        // SAFETY: live work handle.
        check(unsafe { sys::imgclf_c10d_work_wait(self.raw, millis(self.timeout)) })
            .with_context(|| format!("waiting for {}", self.what))
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        // SAFETY: `raw` came from the shim and is dropped once.
        unsafe { sys::imgclf_c10d_work_free(self.raw) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }

    /// Runs `f(rank, group, store)` on `n` ranks (threads of this process, one Gloo group each).
    fn on_ranks<T: Send + 'static>(
        n: usize,
        timeout: Duration,
        f: impl Fn(usize, ProcessGroup, Store) -> Result<T> + Send + Sync + Clone + 'static,
    ) -> Vec<Result<T>> {
        let port = free_port();
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let f = f.clone();
                std::thread::spawn(move || {
                    let store = Store::tcp("127.0.0.1", port, rank == 0, Some(n), false, timeout)?;
                    let pg = ProcessGroup::gloo(&store, rank, n, "127.0.0.1", timeout)?;
                    f(rank, pg, store)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn gloo_all_reduce_broadcast_and_barrier_are_exact() {
        let results = on_ranks(2, Duration::from_secs(60), |rank, pg, store| {
            let t = Tensor::from_slice(&[rank as f32 + 1.0, 10.0 * (rank as f32 + 1.0)]);
            pg.all_reduce(&t, ReduceOp::Sum)?.wait()?;
            let sum = Vec::<f32>::try_from(&t)?;
            let m = Tensor::from_slice(&[rank as f64, -(rank as f64)]);
            pg.all_reduce(&m, ReduceOp::Max)?.wait()?;
            let max = Vec::<f64>::try_from(&m)?;
            let b = Tensor::from_slice(&[rank as i64 * 7 + 1; 3]);
            pg.broadcast(&b, 1)?.wait()?;
            let bc = Vec::<i64>::try_from(&b)?;
            pg.barrier()?.wait()?;
            store.set(&format!("k{rank}"), b"v")?;
            let other = store.get(&format!("k{}", 1 - rank))?;
            let counter = store.add("counter", 1)?;
            Ok((sum, max, bc, other, counter, pg.rank(), pg.size()))
        });
        let mut counters = Vec::new();
        for r in results {
            let (sum, max, bc, other, counter, _rank, size) = r.unwrap();
            assert_eq!(sum, vec![3.0, 30.0]);
            assert_eq!(max, vec![1.0, 0.0]);
            assert_eq!(bc, vec![8, 8, 8]);
            assert_eq!(other, b"v");
            assert_eq!(size, 2);
            counters.push(counter);
        }
        counters.sort();
        assert_eq!(counters, vec![1, 2]);
    }

    #[test]
    fn a_missing_peer_is_an_error_not_an_abort() {
        let port = free_port();
        let store = Store::tcp(
            "127.0.0.1",
            port,
            true,
            Some(2),
            false,
            Duration::from_millis(1500),
        )
        .unwrap();
        // The store's own timeout: a key nobody sets.
        let err = store.get("never-set").unwrap_err();
        assert!(format!("{err:#}").contains("never-set"), "{err:#}");
        // The group's rendezvous: rank 1 never comes.
        let err = ProcessGroup::gloo(&store, 0, 2, "127.0.0.1", Duration::from_millis(1500))
            .err()
            .expect("a group without its second rank");
        let msg = format!("{err:#}");
        assert!(msg.contains("rank 0 of 2"), "{msg}");
        assert!(msg.to_lowercase().contains("time"), "{msg}");
    }
}
