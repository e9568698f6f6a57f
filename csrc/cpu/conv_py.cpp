// The Python fast entries of the conv family's lean routes: ganengine._C.conv3x3_entry,
// .conv_entry and .conv2d_act_entry, called at the top of GF.conv3x3 / GF.conv2d /
// GF.conv_transpose2d / GF.conv2d_act in plain eager mode (GF.conv2d / conv_transpose2d first ask
// .conv_entry_default, conv_entry in the default state, see below; GF.conv3x3 under CPU autocast
// .conv3x3_autocast_entry, eager's own pad + conv in that state).
//
// Why they exist: the dispatcher ops ganengine_C::conv3x3 / ::conv / ::conv2d_act cost more host
// time per call than the generated ATen bindings the eager code calls (the torch.ops call parses
// its arguments against the schema into an IValue stack, and the op's own dispatcher entry plus
// the nested at::conv2d redispatch add 1-1.5 us), which at tiny shapes put the fused call above
// eager. These are METH_FASTCALL functions: they read their arguments directly, ask the same
// checks (conv_lean.h: refusal*), and run the same bodies (run*: route once; where the router
// says oneDNN, at::conv2d / at::conv_transpose2d with ATen's autograd, else the C++ autograd
// Function over the family's kernels), so the numbers are those of the dispatcher op bit for bit.
//
// conv3x3_entry and conv_entry also serve CUDA tensors, on the vendor route (conv_vendor.cpp:
// ATen's convolution, cuDNN, what the Python route's GPU backends run): their last argument,
// ``routes``, says which routes the requested backend allows (ops/_dispatch.conv_routes), and the
// entry takes the one for x's device:
//   1  CPU tensors, the lean route (the cpu backend's router)   (the default where omitted)
//   2  CUDA tensors, the vendor route
//   4  CPU tensors, the vendor route (the CPU proxy of the CUDA path, and tests; over 1)
// conv2d_act_entry takes ``routes`` too, with other bits: 1 CPU tensors on the cpu backend's
// kernels (the default), 8 CUDA tensors on the cuda backend's kernels (csrc/cuda/conv_act.cu, the
// same body as the dispatcher op ganengine_C::conv2d_act serves them with, without its layer; the
// caller asks _dispatch.cuda_entry whether the cuda backend is the one chosen).
//
// Each returns
//   a Tensor        the call, served;
//   None            not served (an argument of another type or value than the entry takes, a
//                   dtype, device, shape, autocast: what the dispatcher op or the Python route's
//                   checks refuse; a device the routes do not allow): the caller's full route
//                   serves it or raises the public error; nothing ran;
//   NotImplemented  a tensor argument of a Tensor subclass (other than Parameter: it may override
//                   __torch_function__; FakeTensor is one), or a torch function mode on: the
//                   caller goes through the dispatcher op, which honours them.
// Any other error is the call's own and raises (c10 errors as the ATen bindings raise them).
//
// autocast_for(x): whether autocast is on for CPU or CUDA tensor x's device (None for anything else:
// the caller asks torch._C._is_any_autocast_enabled). The public functions ask it before their
// autocast shortcut: a METH_O call and a thread-local read, where _is_any_autocast_enabled (a
// pybind11 function) cost ~0.1-0.2 us a call, a fifth of a tiny conv's Python (host_cost's
// conv_small_kernels).
// torch.compile and export never reach these (the Python callers check is_compiling, and the
// torch backend skips them).
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <array>
#include <cctype>

#include "conv_lean.h"

namespace ganengine {
namespace conv_py {
namespace {

using OptT = c10::optional<at::Tensor>;

enum class Arg { Ok, Decline, Dispatcher };

// a tensor argument: a Tensor (Decline otherwise), exactly a Tensor or a Parameter, with no torch
// function mode on (Dispatcher otherwise: a subclass, FakeTensor among them, may override
// __torch_function__; torch's own check for that is not exported to extensions)
Arg tensor_arg(PyObject* o) {
  if (!THPVariable_Check(o)) return Arg::Decline;
  return (THPVariable_CheckExact(o) && !at::impl::torch_function_mode_enabled()) ? Arg::Ok : Arg::Dispatcher;
}

Arg optional_tensor_arg(PyObject* o) { return o == Py_None ? Arg::Ok : tensor_arg(o); }

// an exact int (not a bool: the Python route rejects one)
bool int_arg(PyObject* o, int64_t& v) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  return true;
}

// an exact int, or an exact tuple / list of two exact ints (what ops/_conv_common.pair takes)
bool pair_arg(PyObject* o, std::array<int64_t, 2>& v) {
  if (int_arg(o, v[0])) {
    v[1] = v[0];
    return true;
  }
  if (PyTuple_CheckExact(o) && PyTuple_GET_SIZE(o) == 2)
    return int_arg(PyTuple_GET_ITEM(o, 0), v[0]) && int_arg(PyTuple_GET_ITEM(o, 1), v[1]);
  if (PyList_CheckExact(o) && PyList_GET_SIZE(o) == 2)
    return int_arg(PyList_GET_ITEM(o, 0), v[0]) && int_arg(PyList_GET_ITEM(o, 1), v[1]);
  return false;
}

// the first three arguments, x, weight, bias?: Ok, Decline or Dispatcher
Arg xwb(PyObject* const* args) {
  const Arg a[3] = {tensor_arg(args[0]), tensor_arg(args[1]), optional_tensor_arg(args[2])};
  for (Arg r : a)
    if (r == Arg::Decline) return Arg::Decline;
  for (Arg r : a)
    if (r == Arg::Dispatcher) return Arg::Dispatcher;
  return Arg::Ok;
}

OptT opt(PyObject* o) { return o == Py_None ? OptT() : OptT(THPVariable_Unpack(o)); }

// conv_entry's and conv_entry_default's arguments (x, weight, bias, stride, padding, output_padding,
// transposed), read once by parse_conv for both (conv_call, autocast_call)
struct ConvArgs {
  const at::Tensor* x = nullptr;
  const at::Tensor* w = nullptr;
  OptT b;
  std::array<int64_t, 2> stride, padding, output_padding;
  bool transposed = false;
};

// Ok (``a`` filled), Decline (an argument of another type or value than the entry takes) or
// Dispatcher (a tensor subclass, a torch function mode: xwb), in that order of the arguments
Arg parse_conv(PyObject* const* args, ConvArgs& a) {
  const Arg t = xwb(args);
  if (t != Arg::Ok) return t;
  if (!pair_arg(args[3], a.stride) || !pair_arg(args[4], a.padding) || !pair_arg(args[5], a.output_padding) ||
      !PyBool_Check(args[6]))
    return Arg::Decline;
  a.transposed = args[6] == Py_True;
  a.x = &THPVariable_Unpack(args[0]);
  a.w = &THPVariable_Unpack(args[1]);
  a.b = opt(args[2]);
  return Arg::Ok;
}

// conv3x3_entry's and conv3x3_autocast_entry's arguments (x, weight, bias, padding, padding_mode)
struct Conv3x3Args {
  const at::Tensor* x = nullptr;
  const at::Tensor* w = nullptr;
  OptT b;
  int64_t padding = 0;
  bool reflect = false;  // padding_mode "reflect" (else "zeros")
};

// as parse_conv: padding an exact int, padding_mode "zeros" or "reflect" (compared without
// encoding: a string that cannot be encoded declines, as any other mode)
Arg parse_conv3x3(PyObject* const* args, Conv3x3Args& a) {
  const Arg t = xwb(args);
  if (t != Arg::Ok) return t;
  if (!int_arg(args[3], a.padding) || !PyUnicode_Check(args[4])) return Arg::Decline;
  a.reflect = PyUnicode_CompareWithASCIIString(args[4], "reflect") == 0;
  if (!a.reflect && PyUnicode_CompareWithASCIIString(args[4], "zeros") != 0) return Arg::Decline;
  a.x = &THPVariable_Unpack(args[0]);
  a.w = &THPVariable_Unpack(args[1]);
  a.b = opt(args[2]);
  return Arg::Ok;
}

PyObject* declined() { Py_RETURN_NONE; }
PyObject* to_dispatcher() { Py_RETURN_NOTIMPLEMENTED; }

bool nargs_ok(Py_ssize_t nargs, Py_ssize_t want, const char* name) {
  if (nargs == want) return true;
  PyErr_Format(PyExc_TypeError, "ganengine._C.%s takes %zd arguments, got %zd", name, want, nargs);
  return false;
}

// the routes argument (see the top of the file)
constexpr int64_t kLeanCpu = 1, kVendorCuda = 2, kVendorCpu = 4, kKernelsCuda = 8;
enum class Route { None, Lean, Vendor };

// the optional last argument of an entry taking ``want`` without it: true and ``routes`` set, or
// false with a TypeError set
bool routes_arg(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, const char* name, int64_t& routes) {
  routes = kLeanCpu;
  if (nargs == want + 1) {
    if (int_arg(args[want], routes)) return true;
    PyErr_Format(PyExc_TypeError, "ganengine._C.%s: routes must be an int", name);
    return false;
  }
  if (nargs == want) return true;
  PyErr_Format(PyExc_TypeError, "ganengine._C.%s takes %zd or %zd arguments, got %zd", name, want, want + 1, nargs);
  return false;
}

// the route ``routes`` allows for x's device
Route route_for(const at::Tensor& x, int64_t routes) {
  if (x.is_cpu()) return (routes & kVendorCpu) ? Route::Vendor : (routes & kLeanCpu) ? Route::Lean : Route::None;
  if (x.is_cuda()) return (routes & kVendorCuda) ? Route::Vendor : Route::None;
  return Route::None;
}

// conv3x3_entry(x, weight, bias, padding, padding_mode[, routes])
PyObject* conv3x3_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  int64_t routes;
  if (!routes_arg(args, nargs, 5, "conv3x3_entry", routes)) return nullptr;
  Conv3x3Args a;
  const Arg t = parse_conv3x3(args, a);
  if (t == Arg::Decline) return declined();
  if (t == Arg::Dispatcher) return to_dispatcher();
  const at::Tensor &x = *a.x, &w = *a.w;
  const Route r = route_for(x, routes);
  if (r == Route::None) return declined();
  const bool vendor = r == Route::Vendor;
  if ((vendor ? conv_vendor::refusal3(x, w, a.b, a.padding, a.reflect)
              : conv_lean::refusal3(x, w, a.b, a.padding, a.reflect)) != nullptr)
    return declined();
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = vendor ? conv_vendor::run3(x, w, a.b, a.padding, a.reflect) : conv_lean::run3(x, w, a.b, a.padding, a.reflect);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// conv_entry's body once ``routes`` is known: the output, None or NotImplemented (a new reference);
// throws the call's own errors (the callers' HANDLE_TH_ERRORS convert them)
PyObject* conv_call(PyObject* const* args, int64_t routes) {
  ConvArgs a;
  const Arg t = parse_conv(args, a);
  if (t == Arg::Decline) return declined();
  if (t == Arg::Dispatcher) return to_dispatcher();
  const at::Tensor &x = *a.x, &w = *a.w;
  const Route r = route_for(x, routes);
  if (r == Route::None) return declined();
  const bool vendor = r == Route::Vendor;
  if ((vendor ? conv_vendor::refusal(x, w, a.b, a.stride, a.padding, a.output_padding, a.transposed)
              : conv_lean::refusal(x, w, a.b, a.stride, a.padding, a.output_padding, a.transposed)) != nullptr)
    return declined();
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = vendor ? conv_vendor::run(x, w, a.b, a.stride, a.padding, a.output_padding, a.transposed)
               : conv_lean::run(x, w, a.b, a.stride, a.padding, a.output_padding, a.transposed);
  }
  return THPVariable_Wrap(std::move(y));
}

// conv_entry(x, weight, bias, stride, padding, output_padding, transposed[, routes])
PyObject* conv_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  int64_t routes;
  if (!routes_arg(args, nargs, 7, "conv_entry", routes)) return nullptr;
  return conv_call(args, routes);
  END_HANDLE_TH_ERRORS
}

// ---------------------------------------------------------------------------- the default state's entry
// conv_entry_default(x, weight, bias, stride, padding, output_padding, transposed): conv_entry for a
// CPU tensor in the state GF.conv2d / conv_transpose2d meet on nearly every call (backend 'auto',
// the routes' Python state as conv_default_bind recorded it; under CPU autocast: autocast_call), which there
// asked for that state per call in Python (the autocast probe, _dispatch.conv_routes, the
// last_used record: ~0.5 us, at a tiny conv the whole difference to eager's host time). Served:
// the output, recorded in _dispatch.last_used as "cpu" (the Python route's record); anything else,
// None (nothing ran, nothing recorded): the caller asks its full eager route, in its order.
// (the state is read from namespace dicts, a borrowed lookup each: ~4x cheaper than getattr)
struct DefaultState {
  PyObject* setting = nullptr;    // vars(backends._requested): its "value" None (GANENGINE_BACKEND unset) or "auto"
  PyObject* env_data = nullptr;   // os.environ's own dict
  PyObject* env_key = nullptr;    // GANENGINE_BACKEND as env_data's keys are
  PyObject* guards = nullptr;     // ((namespace dict, name, value), ...): what the routes were resolved with
  PyObject* last_used = nullptr;  // ops/_dispatch.last_used
  int64_t routes = 0;             // the routes for CPU tensors in that state (0: not bound)
};
DefaultState g_default;  // (read and written with the GIL held)
PyObject* s_value = nullptr;
PyObject* s_conv = nullptr;
PyObject* s_cpu = nullptr;
PyObject* s_torch = nullptr;
PyObject* s_conv3x3 = nullptr;

// whether a GANENGINE_BACKEND value (bytes from os.environ's own dict on POSIX, else str) names
// 'auto' as settings.py reads it: unset, empty or blank, or "auto" in any case with blanks around it
bool env_names_auto(PyObject* raw) {
  if (raw == nullptr) return true;
  const char* text = nullptr;
  Py_ssize_t n = 0;
  if (PyBytes_Check(raw)) {
    text = PyBytes_AS_STRING(raw);
    n = PyBytes_GET_SIZE(raw);
  } else if (PyUnicode_Check(raw)) {
    text = PyUnicode_AsUTF8AndSize(raw, &n);
    if (text == nullptr) {
      PyErr_Clear();
      return false;
    }
  } else {
    return false;
  }
  while (n > 0 && std::isspace(static_cast<unsigned char>(*text))) ++text, --n;
  while (n > 0 && std::isspace(static_cast<unsigned char>(text[n - 1]))) --n;
  if (n == 0) return true;
  if (n != 4) return false;
  for (Py_ssize_t i = 0; i < 4; ++i)
    if (std::tolower(static_cast<unsigned char>(text[i])) != "auto"[i]) return false;
  return true;
}

// whether the Python state is the one bound: the requested backend 'auto' and every guard unchanged
bool default_state() {
  if (g_default.routes == 0) return false;
  PyObject* value = PyDict_GetItemWithError(g_default.setting, s_value);  // (borrowed)
  if (value == nullptr) {
    PyErr_Clear();
    return false;
  }
  bool is_auto;
  if (value == Py_None) {  // (then GANENGINE_BACKEND, read as _dispatch / settings.py read it)
    PyObject* raw = PyDict_GetItemWithError(g_default.env_data, g_default.env_key);
    if (raw == nullptr && PyErr_Occurred()) PyErr_Clear();
    is_auto = env_names_auto(raw);
  } else {
    is_auto = PyUnicode_Check(value) && PyUnicode_CompareWithASCIIString(value, "auto") == 0;
  }
  if (!is_auto) return false;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(g_default.guards); ++i) {
    PyObject* guard = PyTuple_GET_ITEM(g_default.guards, i);
    PyObject* now = PyDict_GetItemWithError(PyTuple_GET_ITEM(guard, 0), PyTuple_GET_ITEM(guard, 1));  // (borrowed)
    if (now == nullptr) PyErr_Clear();
    if (now != PyTuple_GET_ITEM(guard, 2)) return false;
  }
  return true;
}

// a dtype CPU autocast casts (fp64 it keeps, which the Python route casts)
bool autocast_casts(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

// every operand of a dtype CPU autocast casts
bool autocast_operands(const at::Tensor& x, const at::Tensor& w, const OptT& b) {
  return autocast_casts(x) && autocast_casts(w) && (!b.has_value() || autocast_casts(*b));
}

// y, recorded in _dispatch.last_used[record] as "torch" (eager's own call); nullptr on an error
PyObject* recorded(at::Tensor y, PyObject* record) {
  if (PyDict_SetItem(g_default.last_used, record, s_torch) != 0) return nullptr;
  return THPVariable_Wrap(std::move(y));
}

// Under CPU autocast (in the default state): ATen's own convolution as eager code calls it (its
// casts, weight-cast cache and autograd), in out_format(x), recorded as "torch": what the Python
// route's _autocast_call (ops/conv.py) does, with the same conditions (plain tensors, x 4-d, every
// operand of a dtype autocast casts, plain int pairs) and nothing ran where ATen refuses (None: the
// route then raises its public error). Asked in Python, these checks cost ~5 us a call (1.1x
// eager's host time at a tiny conv under autocast).
PyObject* autocast_call(PyObject* const* args, PyObject* record) {
  ConvArgs a;
  if (parse_conv(args, a) != Arg::Ok) return declined();
  const at::Tensor &x = *a.x, &w = *a.w;
  if (x.dim() != 4 || !autocast_operands(x, w, a.b)) return declined();
  at::Tensor y;
  try {
    pybind11::gil_scoped_release no_gil;
    y = a.transposed ? at::conv_transpose2d(x, w, a.b, a.stride, a.padding, a.output_padding)
                     : at::conv2d(x, w, a.b, a.stride, a.padding);
    y = y.contiguous(conv_common::out_format(x));
  } catch (const std::exception&) {  // (c10::Error, and oneDNN's own errors: what Python sees as RuntimeError)
    return declined();
  }
  return recorded(std::move(y), record);
}

PyObject* conv_entry_default(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  // (an 8th argument, another family's last_used key: only its convolution under autocast, which
  // conv2d_act makes as conv2d does; never the conv route; conv3x3 has its own entry)
  if (nargs != 8 && !nargs_ok(nargs, 7, "conv_entry_default")) return nullptr;
  if (nargs == 8 && !PyUnicode_CheckExact(args[7])) {
    PyErr_SetString(PyExc_TypeError, "ganengine._C.conv_entry_default: the 8th argument is a last_used key (str)");
    return nullptr;
  }
  if (!THPVariable_Check(args[0])) return declined();
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  if (!x.is_cpu() || !default_state()) return declined();
  if (at::autocast::is_autocast_enabled(at::kCPU)) return autocast_call(args, nargs == 8 ? args[7] : s_conv);
  if (nargs == 8) return declined();
  PyObject* y = conv_call(args, g_default.routes & (kLeanCpu | kVendorCpu));
  if (y == Py_NotImplemented) {  // (a tensor subclass, a torch function mode: the full route's dispatcher op)
    Py_DECREF(y);
    return declined();
  }
  if (y != Py_None && PyDict_SetItem(g_default.last_used, s_conv, s_cpu) != 0) {
    Py_DECREF(y);
    return nullptr;
  }
  return y;
  END_HANDLE_TH_ERRORS
}

// conv3x3_autocast_entry(x, weight, bias, padding, padding_mode): GF.conv3x3 under CPU autocast in
// the default state (conv_entry_default's, bound by ops/conv.py _bind_default): eager's own call of
// CycleGAN's ReflectionPad2d(p) -> Conv2d(3x3) (or Conv2d(3x3, padding=p) for "zeros"), i.e.
// F.conv2d(F.pad(x, (p,) * 4, mode="reflect"), w, b): ATen's reflection pad on x as it is (CPU
// autocast's lists leave the pad in x's dtype), then at::conv2d with autocast's casts, weight-cast
// cache and autograd; in out_format(x), recorded as last_used["conv3x3"] = "torch". The conditions of
// the Python shortcut (ops/conv3x3.py _autocast_call): plain tensors, x 4-d, a 3x3 weight, an int
// padding >= 0, every operand of a dtype autocast casts. None for anything else, the state not bound
// or not the default one, autocast off, or what ATen refuses (a reflect padding not smaller than the
// map: the public function's route raises its own error): nothing ran, nothing recorded. Asked in
// Python, these checks cost ~2 us a call (1.15x eager's host time at a tiny layer).
PyObject* conv3x3_autocast_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!nargs_ok(nargs, 5, "conv3x3_autocast_entry")) return nullptr;
  if (!THPVariable_Check(args[0])) return declined();
  if (!THPVariable_Unpack(args[0]).is_cpu() || !at::autocast::is_autocast_enabled(at::kCPU) || !default_state())
    return declined();
  Conv3x3Args a;
  if (parse_conv3x3(args, a) != Arg::Ok) return declined();
  const at::Tensor &x = *a.x, &w = *a.w;
  const int64_t p = a.padding;
  if (p < 0 || x.dim() != 4 || w.dim() != 4 || w.size(2) != 3 || w.size(3) != 3 || !autocast_operands(x, w, a.b))
    return declined();
  at::Tensor y;
  try {
    pybind11::gil_scoped_release no_gil;
    // (reflection_pad2d: what F.pad(x, pad, "reflect") runs for a 4-d x, without at::pad's two
    // composite layers; the same autograd node)
    const std::array<int64_t, 2> one{1, 1}, zero{0, 0}, pp{p, p};
    y = a.reflect && p > 0 ? at::conv2d(at::reflection_pad2d(x, {p, p, p, p}), w, a.b, one, zero)
                           : at::conv2d(x, w, a.b, one, pp);
    y = y.contiguous(conv_common::out_format(x));
  } catch (const std::exception&) {  // (as autocast_call)
    return declined();
  }
  return recorded(std::move(y), s_conv3x3);
  END_HANDLE_TH_ERRORS
}

// conv_default_bind(setting, env_data, env_key, guards, last_used, routes): records the default
// state (see above: setting and the guards' first entries are namespace dicts); routes 0 unbinds
PyObject* conv_default_bind(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (!nargs_ok(nargs, 6, "conv_default_bind")) return nullptr;
  int64_t routes;
  if (!PyDict_Check(args[0]) || !PyDict_Check(args[1]) || !PyTuple_Check(args[3]) || !PyDict_Check(args[4]) ||
      !int_arg(args[5], routes)) {
    PyErr_SetString(PyExc_TypeError, "ganengine._C.conv_default_bind(setting: dict, env_data: dict, env_key, "
                                     "guards: tuple, last_used: dict, routes: int)");
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[3]); ++i) {
    PyObject* guard = PyTuple_GET_ITEM(args[3], i);
    if (!PyTuple_Check(guard) || PyTuple_GET_SIZE(guard) != 3 || !PyDict_Check(PyTuple_GET_ITEM(guard, 0)) ||
        !PyUnicode_Check(PyTuple_GET_ITEM(guard, 1))) {
      PyErr_SetString(PyExc_TypeError, "ganengine._C.conv_default_bind: each guard must be (dict, name, value)");
      return nullptr;
    }
  }
  PyObject* held[5] = {g_default.setting, g_default.env_data, g_default.env_key, g_default.guards,
                       g_default.last_used};
  for (int i = 0; i < 5; ++i) Py_INCREF(args[i]);
  g_default = DefaultState{args[0], args[1], args[2], args[3], args[4], routes};
  for (PyObject* o : held) Py_XDECREF(o);
  Py_RETURN_NONE;
}

// conv2d_act_entry(x, weight, bias, stride, padding, negative_slope[, routes])
PyObject* conv2d_act_entry(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  int64_t routes;
  if (!routes_arg(args, nargs, 6, "conv2d_act_entry", routes)) return nullptr;
  const Arg t = xwb(args);
  if (t == Arg::Decline) return declined();
  if (t == Arg::Dispatcher) return to_dispatcher();
  std::array<int64_t, 2> stride, padding;
  if (!pair_arg(args[3], stride) || !pair_arg(args[4], padding)) return declined();
  // an exact float or int (the Python route's float(negative_slope) takes these as they are)
  double slope;
  PyObject* s = args[5];
  if (PyFloat_CheckExact(s)) {
    slope = PyFloat_AS_DOUBLE(s);
  } else if (PyLong_CheckExact(s)) {
    slope = PyLong_AsDouble(s);
    if (slope == -1.0 && PyErr_Occurred()) {
      PyErr_Clear();
      return declined();
    }
  } else {
    return declined();
  }
  const at::Tensor& x = THPVariable_Unpack(args[0]);
  const at::Tensor& w = THPVariable_Unpack(args[1]);
  const OptT b = opt(args[2]);
  const bool cuda = x.is_cuda();
  if (!(cuda ? (routes & kKernelsCuda) : (routes & kLeanCpu))) return declined();
  if (conv_act_lean::refusal(x, w, b, stride, padding, slope, cuda) != nullptr) return declined();
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = conv_act_lean::run(x, w, b, stride, padding, slope);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

// autocast_for(x) (see the top of the file)
PyObject* autocast_for(PyObject*, PyObject* o) {
  if (!THPVariable_Check(o)) Py_RETURN_NONE;
  const at::Tensor& x = THPVariable_Unpack(o);
  // (is_autocast_enabled throws for a device type autocast does not know, meta's)
  if (!(x.is_cpu() || x.is_cuda())) Py_RETURN_NONE;
  if (at::autocast::is_autocast_enabled(x.device().type())) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyMethodDef methods[] = {
    {"conv3x3_entry", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv3x3_entry)), METH_FASTCALL,
     "conv3x3_entry(x, weight, bias, padding, padding_mode[, routes]): GF.conv3x3's eager fast entry "
     "(csrc/cpu/conv_py.cpp)"},
    {"conv_entry", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv_entry)), METH_FASTCALL,
     "conv_entry(x, weight, bias, stride, padding, output_padding, transposed[, routes]): GF.conv2d / "
     "GF.conv_transpose2d's eager fast entry"},
    {"conv2d_act_entry", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv2d_act_entry)),
     METH_FASTCALL, "conv2d_act_entry(x, weight, bias, stride, padding, negative_slope[, routes]): GF.conv2d_act's "
     "eager fast entry"},
    {"conv_entry_default", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv_entry_default)),
     METH_FASTCALL, "conv_entry_default(x, weight, bias, stride, padding, output_padding, transposed): conv_entry "
     "in the default state (csrc/cpu/conv_py.cpp)"},
    {"conv3x3_autocast_entry", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv3x3_autocast_entry)),
     METH_FASTCALL, "conv3x3_autocast_entry(x, weight, bias, padding, padding_mode): GF.conv3x3 under CPU autocast "
     "in the default state (eager's reflection pad + conv2d; csrc/cpu/conv_py.cpp)"},
    {"conv_default_bind", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(conv_default_bind)),
     METH_FASTCALL, "conv_default_bind(setting: dict, env_data, env_key, guards, last_used, routes): "
     "conv_entry_default's state"},
    {"autocast_for", autocast_for, METH_O,
     "autocast_for(x): whether autocast is on for x's device (CPU or CUDA tensors; None otherwise)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

void add_entries(pybind11::module_& m) {
  s_value = PyUnicode_InternFromString("value");
  s_conv = PyUnicode_InternFromString("conv");
  s_cpu = PyUnicode_InternFromString("cpu");
  s_torch = PyUnicode_InternFromString("torch");
  s_conv3x3 = PyUnicode_InternFromString("conv3x3");
  if (s_value == nullptr || s_conv == nullptr || s_cpu == nullptr || s_torch == nullptr || s_conv3x3 == nullptr)
    throw pybind11::error_already_set();
  if (PyModule_AddFunctions(m.ptr(), methods) != 0) throw pybind11::error_already_set();
  // conv3x3_entry / conv_entry take ``routes`` (ops/_dispatch.conv_routes asks: a build from before
  // it gets the Python route)
  m.attr("conv_entry_routes") = true;
  m.attr("conv2d_act_entry_routes") = true;  // (and conv2d_act_entry, its bits 1 and 8)
}

}  // namespace conv_py
}  // namespace ganengine
