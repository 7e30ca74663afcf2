// c10d.cpp: a small C interface over libtorch's own distributed engine (c10d), used by
// host/src/dist/. TCPStore / PrefixStore, ProcessGroupGloo (CPU) and, when built with
// USE_C10D_NCCL, ProcessGroupNCCL (CUDA); in-place collectives on at::Tensor (tch's
// `Tensor::as_mut_ptr()` is an `at::Tensor*`); and an `aten::batch_norm` override that reduces
// batch statistics across ranks (SyncBatchNorm for every model, without changing the models).
//
// Every function that can fail returns NULL on success or a malloc'd message (C++ exceptions
// caught here: nothing unwinds into Rust), freed with imgclf_c10d_free_string.

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#ifdef USE_C10D_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

namespace {

struct Store {
  c10::intrusive_ptr<c10d::Store> inner;
};

struct Group {
  c10::intrusive_ptr<c10d::Backend> inner;
  std::chrono::milliseconds timeout;
};

struct Work {
  c10::intrusive_ptr<c10d::Work> inner;
};

char* dup(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

template <typename F>
char* guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return dup(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return dup(e.what());
  } catch (...) {
    return dup("unknown C++ exception in c10d");
  }
}

std::chrono::milliseconds ms(int64_t v) {
  return std::chrono::milliseconds(v);
}

// ---------------------------------------------------------------------------------------------
// SyncBatchNorm: while a group is installed, training-mode aten::batch_norm computes the batch
// mean and variance over the union of every rank's batch (a differentiable all-reduce: its
// backward all-reduces the gradient), so each rank normalises exactly as one process with the
// whole global batch would. Evaluation mode and an uninstalled group use the normal kernel.

std::mutex sync_mutex;
c10::intrusive_ptr<c10d::Backend> sync_group;
std::chrono::milliseconds sync_timeout{0};
std::atomic<bool> sync_registered{false};
std::unique_ptr<torch::Library> sync_library;

c10::intrusive_ptr<c10d::Backend> current_sync_group() {
  std::lock_guard<std::mutex> lock(sync_mutex);
  return sync_group;
}

void allreduce_sum_inplace(const c10::intrusive_ptr<c10d::Backend>& group, at::Tensor& t) {
  std::vector<at::Tensor> v{t};
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  auto work = group->allreduce(v, opts);
  work->wait(sync_timeout);
}

struct AllReduceSum : public torch::autograd::Function<AllReduceSum> {
  static at::Tensor forward(torch::autograd::AutogradContext*, const at::Tensor& x) {
    auto group = current_sync_group();
    TORCH_CHECK(group, "SyncBatchNorm: no process group");
    at::Tensor out = x.contiguous().clone();
    allreduce_sum_inplace(group, out);
    return out;
  }
  static torch::autograd::variable_list backward(
      torch::autograd::AutogradContext*,
      torch::autograd::variable_list grads) {
    auto group = current_sync_group();
    TORCH_CHECK(group, "SyncBatchNorm: no process group in backward");
    at::Tensor g = grads[0].contiguous().clone();
    allreduce_sum_inplace(group, g);
    return {g};
  }
};

at::Tensor sync_batch_norm(
    const at::Tensor& input,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var,
    bool training,
    double momentum,
    double eps,
    bool cudnn_enabled) {
  auto group = training ? current_sync_group() : c10::intrusive_ptr<c10d::Backend>();
  if (!group || input.dim() < 2) {
    return std::get<0>(at::_batch_norm_impl_index(
        input, weight, bias, running_mean, running_var, training, momentum, eps,
        cudnn_enabled));
  }
  // Reduce over every dimension but the channel one (N, H, W, ...).
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < input.dim(); ++d) {
    dims.push_back(d);
  }
  const int64_t channels = input.size(1);
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = channels;
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor x = input.to(acc);
  // One all-reduce for the per-channel sums and the element count, one for the squared
  // deviations from the global mean (two passes, as accurate as the local kernel).
  at::Tensor local_count = at::full({1}, static_cast<double>(input.numel() / channels),
                                    x.options());
  at::Tensor sums = AllReduceSum::apply(at::cat({x.sum(dims), local_count}));
  at::Tensor count = sums.narrow(0, channels, 1);
  at::Tensor mean = sums.narrow(0, 0, channels) / count;
  at::Tensor centered = x - mean.view(shape);
  at::Tensor sq = AllReduceSum::apply((centered * centered).sum(dims));
  at::Tensor var = sq / count;
  at::Tensor out = centered * (var + eps).rsqrt().view(shape);
  if (weight.has_value() && weight->defined()) {
    out = out * weight->view(shape);
  }
  if (bias.has_value() && bias->defined()) {
    out = out + bias->view(shape);
  }
  {
    at::NoGradGuard no_grad;
    const double n = count.item<double>();
    if (running_mean.has_value() && running_mean->defined()) {
      at::Tensor rm = *running_mean;
      rm.mul_(1.0 - momentum).add_(mean.detach().to(rm.scalar_type()), momentum);
    }
    if (running_var.has_value() && running_var->defined()) {
      at::Tensor rv = *running_var;
      const double unbias = n > 1.0 ? n / (n - 1.0) : 1.0;
      rv.mul_(1.0 - momentum).add_(var.detach().to(rv.scalar_type()) * unbias, momentum);
    }
  }
  return out.to(input.scalar_type());
}

}  // namespace

extern "C" {

void imgclf_c10d_free_string(char* s) {
  std::free(s);
}

bool imgclf_c10d_has_nccl() {
#ifdef USE_C10D_NCCL
  return true;
#else
  return false;
#endif
}

// A TCPStore: the server (rank 0 of the built-in launcher; `world_size` workers are waited for
// when `wait_workers`) or a client of one (torchrun's agent store, or rank 0's).
char* imgclf_c10d_tcp_store(
    const char* host,
    uint16_t port,
    bool is_server,
    int64_t world_size,
    bool wait_workers,
    int64_t timeout_ms,
    void** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server;
    if (world_size > 0) {
      opts.numWorkers = static_cast<size_t>(world_size);
    }
    opts.waitWorkers = wait_workers;
    opts.timeout = ms(timeout_ms);
    opts.multiTenant = true;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    *out = new Store{store};
  });
}

char* imgclf_c10d_prefix_store(const char* prefix, void* base, void** out) {
  return guarded([&] {
    auto* b = static_cast<Store*>(base);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), b->inner);
    *out = new Store{store};
  });
}

void imgclf_c10d_store_free(void* store) {
  delete static_cast<Store*>(store);
}

char* imgclf_c10d_store_set(void* store, const char* key, const uint8_t* value, size_t len) {
  return guarded([&] {
    std::vector<uint8_t> v(value, value + len);
    static_cast<Store*>(store)->inner->set(std::string(key), v);
  });
}

// Waits (up to the store's timeout) for `key`; the value is malloc'd, freed with
// imgclf_c10d_free_string.
char* imgclf_c10d_store_get(void* store, const char* key, uint8_t** value, size_t* len) {
  return guarded([&] {
    auto v = static_cast<Store*>(store)->inner->get(std::string(key));
    auto* buf = static_cast<uint8_t*>(std::malloc(v.size() + 1));
    TORCH_CHECK(buf != nullptr, "out of memory");
    std::memcpy(buf, v.data(), v.size());
    *value = buf;
    *len = v.size();
  });
}

char* imgclf_c10d_store_check(void* store, const char* key, bool* present) {
  return guarded([&] {
    *present = static_cast<Store*>(store)->inner->check({std::string(key)});
  });
}

char* imgclf_c10d_store_add(void* store, const char* key, int64_t delta, int64_t* value) {
  return guarded([&] { *value = static_cast<Store*>(store)->inner->add(std::string(key), delta); });
}

// ProcessGroupGloo over `store`, its transport bound to `hostname` (an address of this machine
// the other ranks reach; "if:NAME" an interface; "" this host's resolved name), collectives
// failing after `timeout_ms`.
char* imgclf_c10d_gloo(
    void* store,
    int rank,
    int size,
    const char* hostname,
    int64_t timeout_ms,
    void** out) {
  return guarded([&] {
    auto opts = c10d::ProcessGroupGloo::Options::create(ms(timeout_ms));
    const std::string h(hostname);
    if (h.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    } else if (h.rfind("if:", 0) == 0) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(h.substr(3)));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(h));
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(
        static_cast<Store*>(store)->inner, rank, size, opts);
    *out = new Group{pg, ms(timeout_ms)};
  });
}

// ProcessGroupNCCL on CUDA device `device` (LOCAL_RANK).
char* imgclf_c10d_nccl(
    void* store,
    int rank,
    int size,
    int device,
    int64_t timeout_ms,
    void** out) {
#ifdef USE_C10D_NCCL
  return guarded([&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = ms(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        static_cast<Store*>(store)->inner, rank, size, opts);
    const at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    pg->setBoundDeviceId(dev);
    pg->eagerConnectSingleDevice(dev);
    *out = new Group{pg, ms(timeout_ms)};
  });
#else
  (void)store;
  (void)rank;
  (void)size;
  (void)device;
  (void)timeout_ms;
  (void)out;
  return dup("this imgclf was built without NCCL (its build found no nccl.h)");
#endif
}

void imgclf_c10d_group_free(void* group) {
  auto* g = static_cast<Group*>(group);
  {
    std::lock_guard<std::mutex> lock(sync_mutex);
    if (sync_group && g != nullptr && sync_group.get() == g->inner.get()) {
      sync_group.reset();
    }
  }
  delete g;
}

// Starts an in-place all-reduce (op: 0 sum, 1 average, 2 max, 3 min) of one tensor.
char* imgclf_c10d_allreduce(void* group, void* tensor, int op, void** work) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> v{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions opts;
    switch (op) {
      case 0:
        opts.reduceOp = c10d::ReduceOp::SUM;
        break;
      case 1:
        opts.reduceOp = c10d::ReduceOp::AVG;
        break;
      case 2:
        opts.reduceOp = c10d::ReduceOp::MAX;
        break;
      case 3:
        opts.reduceOp = c10d::ReduceOp::MIN;
        break;
      default:
        TORCH_CHECK(false, "unknown reduce op ", op);
    }
    opts.timeout = g->timeout;
    *work = new Work{g->inner->allreduce(v, opts)};
  });
}

// Starts an in-place broadcast of one tensor from `root`.
char* imgclf_c10d_broadcast(void* group, void* tensor, int root, void** work) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> v{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    *work = new Work{g->inner->broadcast(v, opts)};
  });
}

char* imgclf_c10d_barrier(void* group, void** work) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    *work = new Work{g->inner->barrier(opts)};
  });
}

// Waits for a started collective; the handle stays owned by the caller.
char* imgclf_c10d_work_wait(void* work, int64_t timeout_ms) {
  return guarded([&] {
    auto* w = static_cast<Work*>(work);
    w->inner->wait(ms(timeout_ms));
  });
}

void imgclf_c10d_work_free(void* work) {
  delete static_cast<Work*>(work);
}

// Installs (group != NULL) or removes (NULL) the SyncBatchNorm override of aten::batch_norm.
char* imgclf_c10d_sync_batch_norm(void* group) {
  return guarded([&] {
    auto* g = static_cast<Group*>(group);
    if (g != nullptr && !sync_registered.exchange(true)) {
      // Registered once per process, for the autograd keys: the override runs above autograd,
      // so the ops it calls (and its differentiable all-reduce) are recorded as usual.
      sync_library = std::make_unique<torch::Library>(
          torch::Library::IMPL, "aten", std::nullopt, __FILE__, __LINE__);
      sync_library->impl(
          "batch_norm",
          torch::dispatch(c10::DispatchKey::AutogradCPU, TORCH_FN(sync_batch_norm)));
      sync_library->impl(
          "batch_norm",
          torch::dispatch(c10::DispatchKey::AutogradCUDA, TORCH_FN(sync_batch_norm)));
    }
    std::lock_guard<std::mutex> lock(sync_mutex);
    if (g != nullptr) {
      sync_group = g->inner;
      sync_timeout = g->timeout;
    } else {
      sync_group.reset();
    }
  });
}

}  // extern "C"
