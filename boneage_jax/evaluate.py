r"""Score a trained run (or an ensemble of runs) on a split of its dataset, or on another one.

    python -m boneage_jax.evaluate --workdir=runs/demo [--split=test|validation|train|all] \
        [--which=best|latest] [--tta] [--ensemble=runs/b,runs/c] [--bias_correction] [--quality] [--report] \
        [--config.data.manual_dir=OTHER_FOLDER] [--config.key=value ...]

The run's ``config.json`` is loaded and ``--config.*`` overrides are applied on top of it (data
settings: another dataset folder, sex and age filters, batch size); the model settings
(``model.*``, ``task``, ``loss``, ``data.image_size``, ``data.normalize``) cannot change.

- ``--split``: one of the run's splits (``validation`` is the held-out part of ``train`` in
  the Kaggle layout) or ``all``, every labelled image of every split of the dataset. Default:
  ``test`` when the dataset has one, else ``validation``.
- ``--tta``: test-time augmentation, the mean prediction over the image, its horizontal flip
  (``--tta_flip``) and small rotations (``--tta_angles``, default -5 and +5 degrees) of the
  normalised input (edges replicated).
- ``--ensemble``: more workdirs; the prediction is the members' mean (each member reads the
  images with its own preprocessing). The members combine as a mixture (std of the mixture:
  Gaussian heads with their variance, other heads as points); class heads vote (ties go to
  the class whose mean age is nearest the mean age).
- ``--bias_correction``: fits ``true ~ slope * pred + intercept`` on the validation
  predictions (same models, same TTA) and applies it to the scored split.
- ``--quality``: also runs the quality check (``boneage_jax.quality``, what ``predict`` and the
  service refuse without ``--force``) over the split's stored images: the JSON gets ``quality``
  (``checked``, ``rejected``, ``rejected_fraction``, ``reasons``: the count per reason,
  ``rejected_images``: id and rejection, ``ms_per_image``, and ``metrics``: those of ``all``,
  the ``accepted`` and the ``rejected`` labelled images), the CSV a last column ``quality`` (the
  reason, empty for an accepted image), the printed summary and the report a line on it.

Writes into the (first) workdir ``evaluation_<split>[_latest][_tta][_ensemble][_bc][_on-<folder>].json``
(``results.json``'s keys mae, rmse, r2, num_examples, baseline_mae, checkpoint_step, and mse,
mad_difference, mad_deviation, ccc, mean_error, sd_error, ``breakdown`` per sex and per age
band, ``accuracy`` and ``confusion_matrix`` for class heads, ``bias_correction``, ``inference``
timing and memory, and for uncertainty:

- ``confidence_intervals``: 95% percentile bootstrap intervals of MAE, RMSE and CCC over the
  images (2,000 resamples, seed 0), ``{"mae": {"estimate", "low", "high"}, ...}``;
- ``prediction_interval``: where the per-image intervals come from (``sources``: the gaussian
  head's std, the spread over the TTA views, the spread over the ensemble members; combined as
  mean of the variances + variance of the means), or a ``note`` that there are none (a regression
  or classification head without ``--tta`` or ``--ensemble``);
- ``calibration`` (with intervals and labels): observed coverage and mean width of the normal
  intervals at nominal levels 10%..90% and 95% (``levels``, ``coverage``, ``mean_width``) and
  ``coverage_68``, ``mean_width_68``, ``coverage_95``, ``mean_width_95``;
- ``member_comparison`` (``--ensemble``, labelled): each member's MAE with its interval, and
  paired bootstrap intervals of MAE differences on the same images: each member minus the first
  (``--workdir``) and the ensemble minus each member, before any bias correction)

and ``predictions_<same suffix>.csv`` (id, male, boneage, pred_boneage, [pred_boneage_uncorrected],
[pred_std], [pred_class], and with intervals pred_low_68, pred_high_68, pred_low_95,
pred_high_95; ``_on-<folder>`` is added when ``data.manual_dir`` is not the run's). With
``--bias_correction`` the std is scaled by the correction's slope. ``--report`` also draws the
figures (with ``reliability.png``, the calibration curve) and ``report/report.md``
(``boneage_jax.report``).
"""

from __future__ import annotations

from boneage_jax import cli

COMMAND = cli.EvaluateCommand(report=False)
FLAGS = COMMAND.flags  # --workdir, --split, --which, --tta, ... (the run's --config.* overrides follow them)
main = COMMAND.main

if __name__ == "__main__":
    cli.run(main)
