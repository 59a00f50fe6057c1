"""Linear probe: multinomial logistic regression on frozen features.

Train and test features are extracted once per run and standardised with the
train mean / std; a softmax classifier is fit on the full train set in one
jitted loop (L-BFGS, or Adam with a cosine schedule), with an L2 penalty
`weight_decay / 2 * |W|^2` on the weights (not the bias).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_vision_like.evaluators import common
from big_vision_like.registry import ConfigError

OPTIMIZERS = ("lbfgs", "adam")


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both sets scaled by train statistics, so one lr / decay suits any backbone."""
  mean = train.mean(0)
  std = train.std(0) + 1e-6
  return (train - mean) / std, (test - mean) / std


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "optimizer"))
def fit(x, y, *, num_classes: int, steps: int, lr: float, weight_decay: float,
        optimizer: str):
  """{'w', 'b'} minimising mean cross-entropy + L2 on w over the full batch."""
  params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "b": jnp.zeros((num_classes,), jnp.float32)}

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * weight_decay * jnp.sum(p["w"] ** 2)

  if optimizer == "lbfgs":
    tx = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss_fn)
  else:
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps))
    value_and_grad = lambda p, state: jax.value_and_grad(loss_fn)(p)

  def step(carry, _):
    p, opt_state = carry
    value, grad = value_and_grad(p, state=opt_state)
    updates, opt_state = tx.update(grad, opt_state, p, value=value, grad=grad,
                                   value_fn=loss_fn)
    return (optax.apply_updates(p, updates), opt_state), value

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params


def accuracy(params, x: np.ndarray, labels: np.ndarray) -> float:
  """Fraction of argmax hits; NaN logits (a diverged fit, NaN features) are misses,
  where argmax alone would credit class 0."""
  logits = jnp.asarray(x) @ params["w"] + params["b"]
  return float((np.asarray(common.label_ranks(logits, labels)) == 0).mean())


class LinearProbe(common.FrozenFeatures):
  """Test accuracy of a logistic regression fit on `train_split` features.

  `lr` is Adam's peak rate; L-BFGS picks its steps by line search.
  """

  def __init__(self, data_config, *, mesh, field: str, steps: int = 500,
               lr: float = 0.1, weight_decay: float = 1e-4, optimizer: str = "lbfgs",
               train_split: str = "train", max_train_examples: int | None = None):
    if optimizer not in OPTIMIZERS:
      raise ConfigError(f"{field}.optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if int(steps) < 1:
      raise ConfigError(f"{field}.steps={steps!r} must be >= 1")
    super().__init__(data_config, mesh=mesh, field=field, train_split=train_split,
                     max_train_examples=max_train_examples)
    self.steps, self.lr, self.weight_decay = int(steps), float(lr), float(weight_decay)
    self.optimizer = optimizer

  def run(self, graphdef, state) -> dict[str, float]:
    train, test, classes = self.train_and_test(graphdef, state)
    x_train, x_test = standardize(train["features"], test["features"])
    params = fit(jnp.asarray(x_train), jnp.asarray(train["label"]), num_classes=classes,
                 steps=self.steps, lr=self.lr, weight_decay=self.weight_decay,
                 optimizer=self.optimizer)
    return {"accuracy": accuracy(params, x_test, test["label"]),
            "train_accuracy": accuracy(params, x_train, train["label"])}
