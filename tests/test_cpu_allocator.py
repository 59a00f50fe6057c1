"""Allocator detection behind the 'use tcmalloc on CPU' hint (big_vision_like/cpu_allocator.py)."""
import importlib.util
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest, parameterized

from big_vision_like import cpu_allocator

_GLIBC = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
_TCMALLOC = "/x/libtcmalloc_minimal.so.4"
_A_SPEC = importlib.util.find_spec("json")


def _packages(*names):
  """importlib.util.find_spec as if exactly `names` were installed (a test never
  depends on what this machine has)."""
  fake = lambda name, *a: _A_SPEC if name in names else None
  return mock.patch.object(importlib.util, "find_spec", side_effect=fake)


class CpuAllocatorTest(parameterized.TestCase):

  @parameterized.parameters(
      ("", "system"),
      ("7f20-7f30 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n",
       "tcmalloc"),
      ("7f20-7f30 r-xp 0 08:01 2 /opt/conda/lib/libjemalloc.so.2\n", "jemalloc"))
  def test_reads_the_loaded_library_from_maps(self, extra, want):
    with tempfile.NamedTemporaryFile("w", suffix="maps") as f:
      f.write(_GLIBC + extra)
      f.flush()
      self.assertEqual(cpu_allocator.active(f.name), want)
    self.assertEqual(cpu_allocator.active("/nonexistent/maps"), "system")

  def test_hint_only_for_cpu_on_glibc(self):
    # Whether this machine has tcmalloc or an accelerator plugin installed must not matter.
    with mock.patch.object(cpu_allocator, "active", return_value="system"), \
        mock.patch.object(sys, "platform", "linux"), _packages(), \
        mock.patch.dict(os.environ, {"JAX_PLATFORMS": ""}):
      with mock.patch.object(cpu_allocator, "installed", return_value="/lib/libtcmalloc.so.4"):
        line = cpu_allocator.hint("cpu")
        self.assertIn("LD_PRELOAD=/lib/libtcmalloc.so.4 python -m main", line)
        self.assertIn("docs/cpu_speed.md", line)
        self.assertNotIn("\n", line)
      with mock.patch.object(cpu_allocator, "installed", return_value=None):
        self.assertIn("apt install libtcmalloc-minimal4: python -m main then restarts itself",
                      cpu_allocator.hint("cpu"))
        with _packages("jax_cuda12_plugin"):  # a CPU run where main does not restart
          self.assertIn("set JAX_PLATFORMS=cpu: python -m main restarts itself with it only "
                        "then, as jax_cuda12_plugin is installed", cpu_allocator.hint("cpu"))
      self.assertIsNone(cpu_allocator.hint("gpu"))
    with mock.patch.object(cpu_allocator, "active", return_value="tcmalloc"):
      self.assertIsNone(cpu_allocator.hint("cpu"))

  @parameterized.named_parameters(
      ("nothing", {}, (), None),
      ("cpu_forced", {"JAX_PLATFORMS": "cpu"}, ("jax_cuda12_plugin",), None),
      ("cpu_first", {"JAX_PLATFORMS": "cpu,cuda"}, ("jax_cuda12_plugin",), None),
      ("cuda", {"JAX_PLATFORMS": "cuda"}, (), "JAX_PLATFORMS=cuda"),
      ("cuda_first", {"JAX_PLATFORMS": "cuda,cpu"}, (), "JAX_PLATFORMS=cuda,cpu"),
      ("tpu_old_name", {"JAX_PLATFORM_NAME": "tpu"}, (), "JAX_PLATFORM_NAME=tpu"),
      ("cuda12", {}, ("jax_cuda12_plugin",), "jax_cuda12_plugin is installed"),
      ("cuda13", {}, ("jax_cuda13_plugin",), "jax_cuda13_plugin is installed"),
      ("tpu", {}, ("libtpu",), "libtpu is installed"))
  def test_accelerator_from_environment_and_packages(self, environ, packages, want):
    with _packages(*packages):
      self.assertEqual(cpu_allocator.accelerator(environ), want)

  def test_accelerator_from_a_pjrt_plugin(self):
    root = self.create_tempdir()
    os.makedirs(os.path.join(root.full_path, "jax_plugins", "xla_rocm"))
    with open(os.path.join(root.full_path, "jax_plugins", "xla_rocm", "__init__.py"), "w"):
      pass
    with mock.patch.object(sys, "path", [root.full_path]), mock.patch.dict(sys.modules):
      sys.modules.pop("jax_plugins", None)
      self.assertEqual(cpu_allocator.accelerator({}), "jax_plugins.xla_rocm is installed")

  def test_preloaded_library_is_detected_in_a_real_process(self):
    library = cpu_allocator.installed()
    if library is None:
      self.skipTest("no tcmalloc/jemalloc installed (apt install libtcmalloc-minimal4)")
    code = "from big_vision_like import cpu_allocator; print(cpu_allocator.active())"
    env = dict(os.environ, LD_PRELOAD=library)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    self.assertIn(out, ("tcmalloc", "jemalloc"))
    self.assertIn(out, os.path.basename(library))


class RestartTest(parameterized.TestCase):
  """`python -m main` re-executes itself once with tcmalloc preloaded."""

  def _restart(self, environ, *, platform="linux", allocator="system", library=_TCMALLOC,
               packages=()):
    calls = []
    with mock.patch.object(cpu_allocator, "active", return_value=allocator), \
        mock.patch.object(cpu_allocator, "installed", return_value=library), \
        mock.patch.object(sys, "platform", platform), _packages(*packages):
      cpu_allocator.restart_with_tcmalloc(environ, lambda *a: calls.append(a))
    return calls

  def test_execs_the_same_command_with_tcmalloc_first_in_ld_preload(self):
    environ = {"LD_PRELOAD": "/y/libother.so", "PATH": "/bin"}
    (path, argv, env), = self._restart(environ)
    self.assertEqual(path, sys.executable)
    self.assertEqual(argv[1:], sys.orig_argv[1:])
    self.assertEqual(env["LD_PRELOAD"], f"{_TCMALLOC} /y/libother.so")
    self.assertEqual(env[cpu_allocator.RESTARTED], _TCMALLOC)
    self.assertEqual(env["PATH"], "/bin")
    self.assertEqual(environ, {"LD_PRELOAD": "/y/libother.so", "PATH": "/bin"})  # untouched

  @parameterized.named_parameters(
      ("switched_off", {cpu_allocator.SWITCH: "0"}, {}),
      ("already_restarted", {cpu_allocator.RESTARTED: _TCMALLOC}, {}),
      ("tcmalloc_loaded", {}, {"allocator": "tcmalloc"}),
      ("jemalloc_loaded", {}, {"allocator": "jemalloc"}),
      ("none_installed", {}, {"library": None}),
      ("not_linux", {}, {"platform": "darwin"}),
      ("for_cuda", {"JAX_PLATFORMS": "cuda"}, {}),
      ("for_tpu", {"JAX_PLATFORMS": "tpu,cpu"}, {}),
      ("cuda_plugin_installed", {}, {"packages": ("jax_cuda12_plugin",)}),
      ("cuda13_plugin_installed", {}, {"packages": ("jax_cuda13_plugin",)}),
      ("libtpu_installed", {}, {"packages": ("libtpu",)}))
  def test_no_restart(self, environ, kwargs):
    self.assertEqual(self._restart(environ, **kwargs), [])

  def test_restarts_a_cpu_process_beside_a_gpu_plugin_when_told_cpu(self):
    (_, _, env), = self._restart({"JAX_PLATFORMS": "cpu"}, packages=("jax_cuda12_plugin",))
    self.assertEqual(env["JAX_PLATFORMS"], "cpu")

  def test_a_failed_exec_returns(self):
    def fail(*args):
      raise OSError("exec format error")
    with mock.patch.object(cpu_allocator, "active", return_value="system"), \
        mock.patch.object(cpu_allocator, "installed", return_value=_TCMALLOC), \
        mock.patch.object(sys, "platform", "linux"), _packages():
      self.assertIsNone(cpu_allocator.restart_with_tcmalloc({}, fail))

  def test_restarted_note(self):
    with mock.patch.dict(os.environ, {cpu_allocator.RESTARTED: _TCMALLOC}), \
        mock.patch.object(cpu_allocator, "active", return_value="tcmalloc"):
      self.assertIn(f"Restarted with {_TCMALLOC} preloaded (active)",
                    cpu_allocator.restarted_note())
      self.assertIn(cpu_allocator.SWITCH + "=0", cpu_allocator.restarted_note())
    with mock.patch.dict(os.environ, {cpu_allocator.RESTARTED: _TCMALLOC}), \
        mock.patch.object(cpu_allocator, "active", return_value="system"):
      self.assertIn("NOT loaded", cpu_allocator.restarted_note())  # the loader refused it
    with mock.patch.dict(os.environ, {}, clear=True):
      self.assertIsNone(cpu_allocator.restarted_note())

  def test_a_real_process_restarts_once_with_the_same_pid_and_arguments(self):
    if cpu_allocator.installed(("tcmalloc",)) is None:
      self.skipTest("no tcmalloc installed (apt install libtcmalloc-minimal4)")
    code = ("import os, sys\n"
            "print('start', os.getpid(), flush=True)\n"
            "from big_vision_like import cpu_allocator\n"
            "cpu_allocator.restart_with_tcmalloc()\n"
            "print('running', os.getpid(), cpu_allocator.active(), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", cpu_allocator.RESTARTED, cpu_allocator.SWITCH)}
    env["JAX_PLATFORMS"] = "cpu"  # a CPU process, whatever plugins this machine has
    run = lambda env: subprocess.run([sys.executable, "-c", code, "a", "b c"], env=env,
                                     capture_output=True, text=True, check=True).stdout.split("\n")
    start, again, running, _ = run(env)
    self.assertEqual(start, again)  # the command ran from the top a second time...
    self.assertEqual(running, f"running {start.split()[1]} tcmalloc ['a', 'b c']")  # ...once
    start, running, _ = run(dict(env, **{cpu_allocator.SWITCH: "0"}))
    self.assertEqual(running, f"running {start.split()[1]} system ['a', 'b c']")


if __name__ == "__main__":
  absltest.main()
