"""Class-conditional GANs on scikit-learn's 8x8 digits: MLP generator + projection discriminator.

Command (two presets, two rows of the families table):
    python -m experiments.train_digits_gan --config experiments/configs/digits_gan.py:ns        # runs/digits_gan_ns
    python -m experiments.train_digits_gan --config experiments/configs/digits_gan.py:wgan_gp   # runs/digits_gan_wgan_gp
    # no preset = ns; overrides: --set train.num_steps=2000 --set run_dir=runs/x

Presets: "ns" = non-saturating GAN, Adam(2e-4, betas (0.5, 0.999)), both networks every step, 8000 steps;
"wgan_gp" = WGAN-GP (lambda 10), Adam(2e-4, betas (0.5, 0.9)), 5 critic updates per generator update,
10000 critic steps (2000 generator updates). Batch 64, generator EMA (half-life 5000 images),
samples from the EMA generator, one network call per sample.
Expected runtime: ~1.2 CPU-minutes each (an estimated ~1-1.5 min wall on 2 idle cores). Measured
(2026-12-01, 2-core box shared with other jobs, load average 8.8-9.0): ns 1:43 wall at 70% of the CPU
(user 70 s + sys 2 s, train 81 s), wgan_gp 1:53 wall at 68% (user 76 s + sys 2 s, train 98 s).
Expected result (measured, runs/<name>/metrics.json, 640 samples; real train-vs-test Fréchet floor 12.2):
ns: classifier accuracy 0.998, Fréchet distance 22.6; wgan_gp: classifier accuracy 0.995, Fréchet 16.5
(final critic gap E[D(real)] - E[D(fake)] 1.04, critic gradient norm on interpolates 1.02). Generator
345,472 params (num_params), discriminator / critic 167,425. No likelihood (bpd_kind "none"), nfe 1.
A rerun with the same run_dir resumes from its latest checkpoint (delete the folder to retrain).
"""
import ml_collections

from research.runs.config import check, check_choice, check_positive, check_range

PRESETS = ("ns", "wgan_gp")


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "ns"
    c = ml_collections.ConfigDict()
    c.name = f"digits_gan_{preset}"
    c.run_dir = ""  # empty: runs/<name>
    c.seed = 0
    c.resume = "auto"  # "auto" | "force" | "never" (see experiments.common.open_run)

    c.data = ml_collections.ConfigDict()
    c.data.split_seed = 0
    c.data.test_fraction = 0.2

    c.gan = ml_collections.ConfigDict()
    c.gan.loss = preset  # "ns" (non-saturating) | "wgan_gp"
    c.gan.n_critic = 5 if preset == "wgan_gp" else 1  # critic updates per generator update
    c.gan.gp_weight = 10.0  # lambda of the gradient penalty (wgan_gp)
    c.gan.drift = 0.0  # eps_drift * E[D(real)^2] (wgan_gp; 0: off)
    c.gan.r1_gamma = 0.0  # R1 penalty gamma / 2 * E||grad D(real)||^2 (ns; 0: off)
    c.gan.latent_dim = 64

    c.model = ml_collections.ConfigDict()
    c.model.g_hidden = (512, 512)
    c.model.d_hidden = (512, 256)
    c.model.embed_dim = 32  # generator's label embedding (the discriminator projects on its last features)

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 10000 if preset == "wgan_gp" else 8000  # critic steps (= shared steps)
    c.train.stop_at_step = 0  # >0: stop after this step (simulated pre-emption)
    c.train.batch_size = 64
    c.train.g_learning_rate = 2e-4
    c.train.d_learning_rate = 2e-4
    c.train.b1 = 0.5
    c.train.b2 = 0.9 if preset == "wgan_gp" else 0.999
    c.train.ema_half_life_images = 5000.0  # generator EMA, per generator update; 0: sample the raw params
    c.train.log_every = 200
    c.train.checkpoint_every = 2000
    c.train.keep_checkpoints = 2
    c.train.progress = True
    c.train.tensorboard = False

    c.sample = ml_collections.ConfigDict()
    c.sample.per_class = 64
    c.sample.grid_columns = 16

    c.eval = ml_collections.ConfigDict()
    c.eval.pca_components = 16
    return c


def _check_widths(c, key):
    widths = c.model[key]
    check(isinstance(widths, (tuple, list)) and len(widths) > 0
          and all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths),
          f"model.{key} must be a non-empty tuple of positive ints, got {widths!r}")


def validate(c: ml_collections.ConfigDict) -> None:
    check_choice(c, "gan.loss", ["ns", "wgan_gp"])
    check_choice(c, "resume", ["auto", "force", "never"])
    check_positive(c, "gan.n_critic", "gan.latent_dim", "model.embed_dim", "train.num_steps", "train.batch_size",
                   "train.g_learning_rate", "train.d_learning_rate", "train.log_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "sample.per_class", "sample.grid_columns", "eval.pca_components")
    check_positive(c, "gan.gp_weight", "gan.drift", "gan.r1_gamma", "train.stop_at_step",
                   "train.ema_half_life_images", allow_zero=True)
    for key in ("gan.n_critic", "gan.latent_dim", "model.embed_dim", "train.num_steps", "train.batch_size",
                "train.stop_at_step"):
        group, name = key.split(".")
        check(isinstance(c[group][name], int), f"{key} must be an int, got {c[group][name]!r}")
    check_range(c, "train.b1", 0.0, 0.999)
    check_range(c, "train.b2", 0.0, 0.9999)
    check_range(c, "data.test_fraction", 0.01, 0.99)
    _check_widths(c, "g_hidden")
    _check_widths(c, "d_hidden")
    check(c.train.stop_at_step <= c.train.num_steps,
          f"train.stop_at_step ({c.train.stop_at_step}) must be <= train.num_steps ({c.train.num_steps})")
    check(c.train.num_steps >= c.gan.n_critic,
          f"train.num_steps ({c.train.num_steps}) must be >= gan.n_critic ({c.gan.n_critic}): "
          "the generator is updated every n_critic-th step")
    if c.gan.loss == "wgan_gp":
        check(c.gan.gp_weight > 0, "gan.loss=wgan_gp needs gan.gp_weight > 0")
        check(c.gan.r1_gamma == 0, "gan.r1_gamma applies to gan.loss=ns only; use gan.gp_weight for wgan_gp")
    else:
        check(c.gan.drift == 0, "gan.drift applies to gan.loss=wgan_gp only")
