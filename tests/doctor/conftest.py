"""The doctor's buggy-loop fixtures (defined in ``tests/helpers/doctor_cases.py``)."""

from doctor_cases import (  # noqa: F401  (pytest finds fixtures by name in conftest)
    batch_on_wrong_device,
    batchnorm_batch_of_one,
    batchnorm_last_batch_of_one,
    clean,
    clip_before_unscale,
    decay_on_bias,
    eval_mode_in_train,
    fp16_on_cpu,
    frozen_in_optimizer,
    grad_in_eval,
    item_in_step,
    loss_summed,
    losses_appended,
    missing_zero_grad,
    nondeterministic,
    starved_loader,
    step_raises,
    train_mode_in_eval,
    unregistered_tensor,
)
