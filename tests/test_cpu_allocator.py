"""Allocator detection behind the 'use tcmalloc on CPU' hint (big_vision_like/cpu_allocator.py)."""
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest, parameterized

from big_vision_like import cpu_allocator

_GLIBC = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


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
    with mock.patch.object(cpu_allocator, "active", return_value="system"), \
        mock.patch.object(sys, "platform", "linux"):
      line = cpu_allocator.hint("cpu")
      self.assertIn("LD_PRELOAD=", line)
      self.assertIn("README", line)
      self.assertIsNone(cpu_allocator.hint("gpu"))
    with mock.patch.object(cpu_allocator, "active", return_value="tcmalloc"):
      self.assertIsNone(cpu_allocator.hint("cpu"))

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


if __name__ == "__main__":
  absltest.main()
