// Causal self-attention on cuDNN's fused flash-attention kernels (cuDNN's SDPA graphs, built through the cuDNN
// frontend), in the layouts of attention.rs's `forward` and `backward`: qkv and dqkv (B, T, 3C), out and dout
// (B, T, C), lse float (B, NH, T). Each head is a strided view of those buffers, so nothing is copied or
// transposed. cuDNN's "Stats" output is the same per-query log-sum-exp of the scaled scores that attention.cu's
// kernels keep, so either side's forward can feed either side's backward.
//
// libcudnn.so.9 and the CUDA runtime are opened at run time (the frontend's dynamic loading), by
// `nanogpt_cudnn_open` only: the CUDA addon loads and runs its own kernels where cuDNN is not installed. The functions below return 0 on success,
// else write a one-line reason into `error` and return 1; no C++ exception leaves them.

#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include <cudnn_frontend.h>

namespace fe = cudnn_frontend;

// The handle the frontend's dynamic loading looks every cuDNN function up in.
void* cudnn_frontend::cudnn_dlhandle = nullptr;

namespace {

enum Uid : int64_t { Q = 1, K, V, O, STATS, DO, DQ, DK, DV };

// Each graph's shape; a training run meets one (two with evaluation at another batch size).
using Shape = std::tuple<int, int, int, int>;  // B, T, C, NH

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace_bytes = 0;
};

void fail(char* error, size_t error_len, const std::string& message) {
  if (error_len > 0) std::snprintf(error, error_len, "%s", message.c_str());
}

// A head of an activation laid out (B, T, width) whose head h starts at column h * HS: dims (B, NH, T, HS).
fe::graph::Tensor_attributes head_view(const char* name, int64_t uid, Shape s, int64_t width) {
  const auto [B, T, C, NH] = s;
  const int64_t HS = C / NH;
  return fe::graph::Tensor_attributes()
      .set_name(name)
      .set_uid(uid)
      .set_dim({B, NH, T, HS})
      .set_stride({(int64_t)T * width, HS, width, 1});
}

fe::graph::Tensor_attributes stats_view(Shape s) {
  const auto [B, T, C, NH] = s;
  return fe::graph::Tensor_attributes()
      .set_name("stats")
      .set_uid(STATS)
      .set_dim({B, NH, T, 1})
      .set_stride({(int64_t)NH * T, T, 1, 1})
      .set_data_type(fe::DataType_t::FLOAT);
}

// A bf16 graph (float softmax and accumulators) with qkv's three views as its inputs.
struct QkvGraph {
  std::shared_ptr<fe::graph::Graph> graph;
  std::shared_ptr<fe::graph::Tensor_attributes> q, k, v;
};

QkvGraph graph_over_qkv(Shape s) {
  const int64_t C3 = 3 * std::get<2>(s);
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(fe::DataType_t::BFLOAT16)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto q = graph->tensor(head_view("q", Q, s, C3));
  auto k = graph->tensor(head_view("k", K, s, C3));
  auto v = graph->tensor(head_view("v", V, s, C3));
  return {graph, q, k, v};
}

// 1 / sqrt(head size), as attention.cu's kernels scale the scores.
float score_scale(Shape s) { return 1.0f / std::sqrt((float)(std::get<2>(s) / std::get<3>(s))); }

std::shared_ptr<fe::graph::Graph> forward_graph(Shape s) {
  auto [graph, q, k, v] = graph_over_qkv(s);
  auto options =
      fe::graph::SDPA_attributes().set_name("attention_forward").set_generate_stats(true).set_attn_scale(score_scale(s)).set_causal_mask(true);
  auto [o, stats] = graph->sdpa(q, k, v, options);
  const auto o_view = head_view("o", O, s, std::get<2>(s));
  o->set_output(true).set_uid(O).set_dim(o_view.get_dim()).set_stride(o_view.get_stride());
  const auto stats_layout = stats_view(s);
  stats->set_output(true)
      .set_uid(STATS)
      .set_dim(stats_layout.get_dim())
      .set_stride(stats_layout.get_stride())
      .set_data_type(fe::DataType_t::FLOAT);
  return graph;
}

std::shared_ptr<fe::graph::Graph> backward_graph(Shape s) {
  const int64_t C = std::get<2>(s);
  auto [graph, q, k, v] = graph_over_qkv(s);
  auto o = graph->tensor(head_view("o", O, s, C));
  auto d_o = graph->tensor(head_view("dO", DO, s, C));
  auto stats = graph->tensor(stats_view(s));
  auto options = fe::graph::SDPA_backward_attributes().set_name("attention_backward").set_attn_scale(score_scale(s)).set_causal_mask(true);
  auto [dq, dk, dv] = graph->sdpa_backward(q, k, v, o, d_o, stats, options);
  const std::pair<std::shared_ptr<fe::graph::Tensor_attributes>, Uid> grads[] = {{dq, DQ}, {dk, DK}, {dv, DV}};
  for (const auto& [grad, uid] : grads) {
    const auto view = head_view("dqkv", uid, s, 3 * C);
    grad->set_output(true).set_uid(uid).set_dim(view.get_dim()).set_stride(view.get_stride());
  }
  return graph;
}

}  // namespace

struct NanogptCudnn {
  cudnnHandle_t handle = nullptr;
  std::map<Shape, Plan> forward, backward;
};

namespace {

// The plan of `s`, built at its first use (cuDNN's heuristics pick the kernel).
int plan_for(NanogptCudnn* cudnn, bool backward, Shape s, Plan** plan, char* error, size_t error_len) {
  auto& plans = backward ? cudnn->backward : cudnn->forward;
  auto found = plans.find(s);
  if (found == plans.end()) {
    Plan built;
    built.graph = backward ? backward_graph(s) : forward_graph(s);
    auto status = built.graph->build(cudnn->handle, {fe::HeurMode_t::A});
    if (status.is_good()) status = built.graph->get_workspace_size(built.workspace_bytes);
    if (!status.is_good()) {
      const auto [B, T, C, NH] = s;
      fail(error, error_len,
           std::string("cuDNN has no ") + (backward ? "backward" : "forward") + " attention plan for B=" + std::to_string(B) +
               ", T=" + std::to_string(T) + ", C=" + std::to_string(C) + ", n_head=" + std::to_string(NH) + ": " + status.get_message());
      return 1;
    }
    found = plans.emplace(s, std::move(built)).first;
  }
  *plan = &found->second;
  return 0;
}

// Runs `body`, turning what the frontend throws (a library it cannot load, for one) into an error line.
template <typename Body>
int guarded(char* error, size_t error_len, Body body) {
  try {
    return body();
  } catch (const std::exception& e) {
    fail(error, error_len, std::string("cuDNN: ") + e.what());
  } catch (...) {
    fail(error, error_len, "cuDNN: unknown error");
  }
  return 1;
}

}  // namespace

extern "C" {

// B, T, C and n_head of a pass, as attention.rs's `forward` and `backward` take them.
struct NanogptAttentionShape {
  int b, t, c, n_head;
};

// Opens libcudnn.so.9 and a cuDNN handle that queues its work on `stream` (a CUstream).
int nanogpt_cudnn_open(void* stream, NanogptCudnn** out, char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    if (cudnn_frontend::cudnn_dlhandle == nullptr) {
      cudnn_frontend::cudnn_dlhandle = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_GLOBAL);
      if (cudnn_frontend::cudnn_dlhandle == nullptr) {
        const char* why = dlerror();
        fail(error, error_len, std::string("cannot load libcudnn.so.9 (") + (why ? why : "not found") + ")");
        return 1;
      }
    }
    // The frontend calls the CUDA runtime too (device properties, the workspace's memsets), through its own
    // dlopen of libcudart; loading it here makes a missing runtime stop at device open, not at the first step.
    try {
      fe::detail::get_cuda_runtime_version();
    } catch (const std::exception& e) {
      fail(error, error_len, std::string("cannot load the CUDA runtime (libcudart.so.13 or .so.12) that cuDNN's frontend calls: ") + e.what());
      return 1;
    }
    auto cudnn = std::make_unique<NanogptCudnn>();
    if (const auto status = fe::detail::create_handle(&cudnn->handle); status != CUDNN_STATUS_SUCCESS) {
      fail(error, error_len, "cudnnCreate failed (cudnnStatus_t " + std::to_string(status) + "): no usable GPU for cuDNN in this process");
      return 1;
    }
    if (const auto status = fe::detail::set_stream(cudnn->handle, static_cast<cudaStream_t>(stream)); status != CUDNN_STATUS_SUCCESS) {
      fe::detail::destroy_handle(cudnn->handle);
      fail(error, error_len, "cudnnSetStream failed (cudnnStatus_t " + std::to_string(status) + ")");
      return 1;
    }
    *out = cudnn.release();
    return 0;
  });
}

void nanogpt_cudnn_close(NanogptCudnn* cudnn) {
  if (cudnn == nullptr) return;
  try {
    cudnn->forward.clear();
    cudnn->backward.clear();
    fe::detail::destroy_handle(cudnn->handle);
  } catch (...) {
  }
  delete cudnn;
}

// The workspace bytes the forward (backward = 0) or backward pass of this shape needs, building its plan.
int nanogpt_cudnn_attention_workspace(NanogptCudnn* cudnn, int backward, NanogptAttentionShape s, int64_t* bytes, char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    Plan* plan = nullptr;
    if (plan_for(cudnn, backward != 0, {s.b, s.t, s.c, s.n_head}, &plan, error, error_len) != 0) return 1;
    *bytes = plan->workspace_bytes;
    return 0;
  });
}

// out (B, T, C) bf16 and lse (B, NH, T) float from qkv (B, T, 3C) bf16, queued on the handle's stream.
int nanogpt_cudnn_attention_forward(NanogptCudnn* cudnn, void* out, void* lse, void* qkv, NanogptAttentionShape s, void* workspace, char* error,
                                    size_t error_len) {
  return guarded(error, error_len, [&] {
    Plan* plan = nullptr;
    if (plan_for(cudnn, false, {s.b, s.t, s.c, s.n_head}, &plan, error, error_len) != 0) return 1;
    auto* qkv_bytes = static_cast<char*>(qkv);
    const size_t head_offset = (size_t)s.c * 2;  // bytes from Q's columns to K's, K's to V's
    std::unordered_map<int64_t, void*> pack = {
        {Q, qkv_bytes}, {K, qkv_bytes + head_offset}, {V, qkv_bytes + 2 * head_offset}, {O, out}, {STATS, lse}};
    auto status = plan->graph->execute(cudnn->handle, pack, workspace);
    if (!status.is_good()) {
      fail(error, error_len, "cuDNN attention forward: " + status.get_message());
      return 1;
    }
    return 0;
  });
}

// dqkv (B, T, 3C) bf16, written in full, from dout (B, T, C) and the forward's qkv, out and lse.
int nanogpt_cudnn_attention_backward(NanogptCudnn* cudnn, void* dqkv, void* dout, void* qkv, void* out, void* lse, NanogptAttentionShape s,
                                     void* workspace, char* error, size_t error_len) {
  return guarded(error, error_len, [&] {
    Plan* plan = nullptr;
    if (plan_for(cudnn, true, {s.b, s.t, s.c, s.n_head}, &plan, error, error_len) != 0) return 1;
    auto* qkv_bytes = static_cast<char*>(qkv);
    auto* dqkv_bytes = static_cast<char*>(dqkv);
    const size_t head_offset = (size_t)s.c * 2;
    std::unordered_map<int64_t, void*> pack = {
        {Q, qkv_bytes},   {K, qkv_bytes + head_offset},   {V, qkv_bytes + 2 * head_offset},   {O, out},
        {DO, dout},       {STATS, lse},                   {DQ, dqkv_bytes},                   {DK, dqkv_bytes + head_offset},
        {DV, dqkv_bytes + 2 * head_offset}};
    auto status = plan->graph->execute(cudnn->handle, pack, workspace);
    if (!status.is_good()) {
      fail(error, error_len, "cuDNN attention backward: " + status.get_message());
      return 1;
    }
    return 0;
  });
}

}  // extern "C"
