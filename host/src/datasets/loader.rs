//! Batches of any dataset split, made by `num_workers` threads in a bounded window ahead of the
//! consumer and handed out in order.
//!
//! Each worker claims the next batch index, fills its samples ([`Samples::fill`]) and sends the
//! batch; the consumer takes batches strictly in order. At most `2 * num_workers` batches are
//! claimed ahead of the one being consumed (PyTorch's default `prefetch_factor` 2), so memory
//! stays bounded whatever the dataset size. `num_workers` 0 makes each batch on the consumer's
//! thread when it is asked for, as PyTorch's main-process loading. Every random draw of a sample
//! comes from (seed, epoch, sample index), so the batches are the same for any worker count and
//! a resumed epoch sees the same samples. Workers never call into libtorch.

use super::{DatasetError, ImageSet};
use imgclf_plugin_api::rng::{mix_seed, step_rng, StepRng};
use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// Salt of the per-sample random stream.
const SAMPLE_STREAM: u64 = 0x5341_4d50_4c45;

/// One split of a dataset as the loader sees it.
pub trait Samples: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when there is no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// (channels, height, width) of every sample as [`fill`](Self::fill) writes it.
    fn shape(&self) -> [usize; 3];
    /// Writes sample `index` (C x H x W uint8) into `out` with the draws of `rng` and returns
    /// its label; `Ok(None)` when the sample was skipped (an unreadable image with
    /// `dataset.skip_unreadable`).
    fn fill(
        &self,
        index: usize,
        rng: &mut StepRng,
        out: &mut [u8],
    ) -> Result<Option<i64>, DatasetError>;
}

impl Samples for ImageSet {
    fn len(&self) -> usize {
        ImageSet::len(self)
    }
    fn shape(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
    fn fill(
        &self,
        index: usize,
        _rng: &mut StepRng,
        out: &mut [u8],
    ) -> Result<Option<i64>, DatasetError> {
        out.copy_from_slice(self.image(index));
        Ok(Some(self.labels[index]))
    }
}

/// The images (uint8, N x C x H x W, row-major) and labels of one batch, as plain buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawBatch {
    /// Index of the batch within its epoch.
    pub index: usize,
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    pub shape: [i64; 4],
}

/// The generator of sample `index` in `epoch`.
pub fn sample_rng(seed: u64, epoch: u64, index: usize) -> StepRng {
    step_rng(mix_seed(&[seed, epoch, index as u64, SAMPLE_STREAM]))
}

/// Makes the batch of `indices` (skipped samples left out; an error when all were skipped).
pub fn make_batch(
    samples: &dyn Samples,
    indices: &[usize],
    index: usize,
    seed: u64,
    epoch: u64,
) -> Result<RawBatch, DatasetError> {
    let [c, h, w] = samples.shape();
    let per = c * h * w;
    let mut images = vec![0u8; indices.len() * per];
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        let n = labels.len();
        let mut rng = sample_rng(seed, epoch, i);
        if let Some(label) = samples.fill(i, &mut rng, &mut images[n * per..(n + 1) * per])? {
            labels.push(label);
        }
    }
    if labels.is_empty() && !indices.is_empty() {
        return Err(DatasetError::Format {
            path: Default::default(),
            msg: format!(
                "every image of batch {index} was unreadable and skipped; check the dataset"
            ),
        });
    }
    images.truncate(labels.len() * per);
    Ok(RawBatch {
        index,
        images,
        shape: [labels.len() as i64, c as i64, h as i64, w as i64],
        labels,
    })
}

/// What to load in one epoch.
#[derive(Clone)]
pub struct EpochPlan {
    /// Sample indices in epoch order.
    pub order: Vec<usize>,
    pub batch_size: usize,
    /// Batches `start..end` of the epoch are made.
    pub start: usize,
    pub end: usize,
    pub seed: u64,
    pub epoch: u64,
}

impl EpochPlan {
    fn indices(&self, b: usize) -> &[usize] {
        let lo = (b * self.batch_size).min(self.order.len());
        let hi = ((b + 1) * self.batch_size).min(self.order.len());
        &self.order[lo..hi]
    }
}

struct Window {
    next_claim: usize,
    /// Batches before this one have been handed to the consumer.
    consumed: usize,
    stop: bool,
}

struct Shared {
    window: Mutex<Window>,
    wake: Condvar,
}

/// The batches of one epoch, in order.
pub struct BatchStream {
    samples: Arc<dyn Samples>,
    plan: Arc<EpochPlan>,
    next: usize,
    shared: Arc<Shared>,
    rx: Option<Receiver<(usize, Result<RawBatch, DatasetError>)>>,
    pending: BTreeMap<usize, Result<RawBatch, DatasetError>>,
    workers: Vec<JoinHandle<()>>,
}

/// Starts loading the batches of `plan` with `num_workers` threads (0: on the consumer's
/// thread).
pub fn spawn(samples: Arc<dyn Samples>, plan: EpochPlan, num_workers: usize) -> BatchStream {
    let plan = Arc::new(plan);
    let shared = Arc::new(Shared {
        window: Mutex::new(Window {
            next_claim: plan.start,
            consumed: plan.start,
            stop: false,
        }),
        wake: Condvar::new(),
    });
    let mut stream = BatchStream {
        samples: samples.clone(),
        plan: plan.clone(),
        next: plan.start,
        shared: shared.clone(),
        rx: None,
        pending: BTreeMap::new(),
        workers: Vec::new(),
    };
    if num_workers == 0 || plan.start >= plan.end {
        return stream;
    }
    let depth = 2 * num_workers;
    let (tx, rx) = channel();
    for k in 0..num_workers {
        let (samples, plan, shared, tx) =
            (samples.clone(), plan.clone(), shared.clone(), tx.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("imgclf-loader-{k}"))
            .spawn(move || loop {
                let b = {
                    let mut w = shared.window.lock().unwrap_or_else(|p| p.into_inner());
                    while !w.stop && w.next_claim < plan.end && w.next_claim >= w.consumed + depth {
                        w = shared.wake.wait(w).unwrap_or_else(|p| p.into_inner());
                    }
                    if w.stop || w.next_claim >= plan.end {
                        return;
                    }
                    w.next_claim += 1;
                    w.next_claim - 1
                };
                let batch = make_batch(&*samples, plan.indices(b), b, plan.seed, plan.epoch);
                if tx.send((b, batch)).is_err() {
                    return; // the consumer is gone
                }
            });
        match spawned {
            Ok(handle) => stream.workers.push(handle),
            // Fewer threads (none: the consumer makes the batches itself) rather than a failure.
            Err(e) => tracing::warn!("cannot start data-loading thread {k}: {e}"),
        }
    }
    if !stream.workers.is_empty() {
        stream.rx = Some(rx);
    }
    stream
}

impl Iterator for BatchStream {
    type Item = Result<RawBatch, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.plan.end {
            return None;
        }
        let b = self.next;
        let batch = match &self.rx {
            None => make_batch(
                &*self.samples,
                self.plan.indices(b),
                b,
                self.plan.seed,
                self.plan.epoch,
            ),
            Some(rx) => loop {
                if let Some(batch) = self.pending.remove(&b) {
                    break batch;
                }
                match rx.recv() {
                    Ok((i, batch)) => {
                        self.pending.insert(i, batch);
                    }
                    Err(_) => {
                        break Err(DatasetError::Format {
                            path: Default::default(),
                            msg: format!("the data-loading threads stopped before batch {b}"),
                        })
                    }
                }
            },
        };
        self.next += 1;
        {
            let mut w = self.shared.window.lock().unwrap_or_else(|p| p.into_inner());
            w.consumed = self.next;
        }
        self.shared.wake.notify_all();
        Some(batch)
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.shared
            .window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.shared.wake.notify_all();
        self.rx = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A split with its `dataloader` settings: what the trainer and the evaluation iterate.
#[derive(Clone)]
pub struct Loader {
    pub samples: Arc<dyn Samples>,
    pub num_workers: usize,
    /// Copy batches to a CUDA device through page-locked memory.
    pub pin_memory: bool,
    /// With `pin_memory`: copy asynchronously.
    pub non_blocking: bool,
}

impl Loader {
    pub fn new(samples: Arc<dyn Samples>, num_workers: usize) -> Self {
        Loader {
            samples,
            num_workers,
            pin_memory: false,
            non_blocking: false,
        }
    }

    /// `<section>.num_workers`, `.pin_memory` and `.non_blocking` of a config's dataloader
    /// section (`train.dataloader`, `validation.dataloader`, `test.dataloader`; the test
    /// section has no `non_blocking`).
    pub fn configured(samples: Arc<dyn Samples>, c: &crate::config::Config, section: &str) -> Self {
        let key = |k: &str| format!("{section}.{k}");
        Loader {
            samples,
            num_workers: c.int(&key("num_workers")).max(0) as usize,
            pin_memory: c.bool(&key("pin_memory")),
            non_blocking: c.get(&key("non_blocking")) == Some(&crate::config::Value::Bool(true)),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// True when there is no sample.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The batches of `plan`, made by this loader's workers.
    pub fn epoch(&self, plan: EpochPlan) -> BatchStream {
        spawn(self.samples.clone(), plan, self.num_workers)
    }

    /// `indices` in order, in batches of `batch_size` (validation and test: no randomness
    /// is drawn by their transforms).
    pub fn in_order(&self, indices: Vec<usize>, batch_size: usize) -> BatchStream {
        let bs = batch_size.max(1);
        self.epoch(EpochPlan {
            end: indices.len().div_ceil(bs),
            order: indices,
            batch_size: bs,
            start: 0,
            seed: 0,
            epoch: 0,
        })
    }

    /// One batch of `indices`, made now on this thread.
    pub fn batch(&self, indices: &[usize]) -> Result<RawBatch, DatasetError> {
        make_batch(&*self.samples, indices, 0, 0, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgclf_plugin_api::rng::Rng;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Sample i is filled with one random byte of its generator; records how far ahead the
    /// workers ran.
    struct Probe {
        n: usize,
        filled: AtomicUsize,
        fail_at: Option<usize>,
    }

    impl Samples for Probe {
        fn len(&self) -> usize {
            self.n
        }
        fn shape(&self) -> [usize; 3] {
            [1, 1, 2]
        }
        fn fill(
            &self,
            index: usize,
            rng: &mut StepRng,
            out: &mut [u8],
        ) -> Result<Option<i64>, DatasetError> {
            self.filled.fetch_add(1, Ordering::SeqCst);
            if Some(index) == self.fail_at {
                return Err(DatasetError::Format {
                    path: format!("img{index}.jpg").into(),
                    msg: "cannot decode".into(),
                });
            }
            if index % 7 == 3 {
                return Ok(None); // skipped
            }
            out[0] = index as u8;
            out[1] = rng.gen();
            Ok(Some(index as i64))
        }
    }

    fn plan(n: usize, bs: usize, start: usize) -> EpochPlan {
        let order: Vec<usize> = (0..n).rev().collect();
        EpochPlan {
            end: n.div_ceil(bs),
            order,
            batch_size: bs,
            start,
            seed: 5,
            epoch: 2,
        }
    }

    fn collect(workers: usize, start: usize) -> Vec<RawBatch> {
        let probe = Arc::new(Probe {
            n: 50,
            filled: AtomicUsize::new(0),
            fail_at: None,
        });
        spawn(probe, plan(50, 8, start), workers)
            .map(|b| b.unwrap())
            .collect()
    }

    #[test]
    fn batches_are_the_same_for_any_worker_count_and_in_order() {
        let serial = collect(0, 0);
        assert_eq!(serial.len(), 7);
        assert_eq!(
            serial.iter().map(|b| b.index).collect::<Vec<_>>(),
            (0..7).collect::<Vec<_>>()
        );
        // Batch 0 holds samples 49..42 minus the skipped 45 (45 % 7 == 3).
        assert_eq!(serial[0].labels, [49, 48, 47, 46, 44, 43, 42]);
        assert_eq!(serial[0].shape, [7, 1, 1, 2]);
        assert_eq!(serial[0].images.len(), 14);
        for w in [1, 3, 8] {
            assert_eq!(collect(w, 0), serial, "{w} workers");
        }
        // Resuming at batch 4 gives the same batches 4.. (same draws per sample).
        assert_eq!(collect(2, 4), serial[4..].to_vec());
    }

    #[test]
    fn an_error_names_the_file_and_workers_stay_bounded() {
        let probe = Arc::new(Probe {
            n: 400,
            filled: AtomicUsize::new(0),
            fail_at: Some(394), // order[5]: batch 1 (the order is reversed)
        });
        let mut s = spawn(probe.clone(), plan(400, 4, 0), 2);
        assert!(s.next().unwrap().is_ok());
        let e = s.next().unwrap().unwrap_err().to_string();
        assert!(e.contains("img394.jpg"), "{e}");
        // Consumed 2 batches: at most 2 + 2 * 2 workers' window + 2 in flight were made.
        std::thread::yield_now();
        let filled = probe.filled.load(Ordering::SeqCst);
        assert!(filled <= (2 + 4 + 2) * 4, "{filled}");
        drop(s); // joins the workers
    }

    #[test]
    fn image_sets_are_copied_as_stored() {
        let set = Arc::new(ImageSet {
            images: (0..40u8).collect(),
            labels: (0..10).collect(),
            channels: 1,
            height: 2,
            width: 2,
        });
        let p = EpochPlan {
            order: vec![3, 1, 4],
            batch_size: 2,
            start: 0,
            end: 2,
            seed: 0,
            epoch: 0,
        };
        let got: Vec<RawBatch> = spawn(set, p, 2).map(|b| b.unwrap()).collect();
        assert_eq!(got[0].images, [12, 13, 14, 15, 4, 5, 6, 7]);
        assert_eq!(got[1].labels, [4]);
        assert_eq!(got[1].shape, [1, 1, 2, 2]);
    }
}
