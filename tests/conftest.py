"""pytest runs absltest cases without absl's main: mark absl flags as parsed
(absltest's temp dirs and grain's worker processes read them)."""
from absl import flags

if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
