"""Per-fold training log: a text log, a JSON history of epoch metrics, and ``progress.png``."""

from __future__ import annotations

import datetime
import math
from pathlib import Path

from latdiffunet.utilities.file_io import atomic_path, load_json, write_json


class TrainingLogger:
    """Append-only epoch history that survives resume (it is reloaded from ``metrics.json``).

    ``active=False`` (every process but rank 0 of a data-parallel run) writes and prints nothing:
    one run, one log.
    """

    def __init__(self, folder: Path, echo: bool = True, active: bool = True):
        self.folder = folder
        self.echo = echo
        self.active = active
        self.history_file = folder / "metrics.json"
        self.log_file = folder / "training_log.txt"
        self.history: list[dict] = load_json(self.history_file) if self.history_file.is_file() else []

    def log(self, message: str) -> None:
        if not self.active:
            return
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(f"{stamp}: {message}\n")
        if self.echo:
            print(message, flush=True)

    def truncate(self, epochs_done: int) -> None:
        """On resume, forget epochs after the checkpoint (they will be redone)."""
        self.history = [h for h in self.history if h["epoch"] < epochs_done]

    def record_epoch(self, metrics: dict) -> None:
        if not self.active:
            return
        self.history.append(metrics)
        write_json(self.history, self.history_file)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        h = self.history
        if not h:
            return
        epochs = [e["epoch"] for e in h]
        fig, axes = plt.subplots(4, 1, figsize=(10, 13), sharex=True)
        for key, label in (("train_loss", "train loss"), ("latent_loss", "latent loss"), ("decoded_loss", "decoded seg loss"),
                           ("adv_d_loss", "discriminator loss"), ("adv_g_loss", "generator adversarial loss")):
            ys = [e.get(key, math.nan) for e in h]
            if any(not math.isnan(y) for y in ys):
                axes[0].plot(epochs, ys, label=label)
        axes[0].set_ylabel("loss")
        axes[0].set_yscale("log")
        axes[0].legend(loc="upper right")
        for key, label, style in (
            ("val_reconstruction_dice", "autoencoder reconstruction Dice (val)", "o-"),
            ("val_dice", "sampled prediction Dice (val)", "s-"),
        ):
            pts = [(e["epoch"], e[key]) for e in h if key in e and e[key] is not None]
            if pts:
                axes[1].plot(*zip(*pts), style, label=label)
        axes[1].set_ylabel("mean foreground Dice")
        axes[1].set_ylim(0, 1)
        if axes[1].get_legend_handles_labels()[0]:
            axes[1].legend(loc="lower right")
        axes[2].plot(epochs, [e.get("lr", math.nan) for e in h])
        axes[2].set_ylabel("learning rate")
        axes[3].plot(epochs, [e.get("epoch_time", math.nan) for e in h])
        axes[3].set_ylabel("epoch time (s)")
        axes[3].set_xlabel("epoch")
        stage_change = next((e["epoch"] for e in h if e.get("stage") == "diffusion"), None)
        for ax in axes:
            ax.grid(alpha=0.3)
            if stage_change is not None:
                ax.axvline(stage_change - 0.5, color="grey", ls="--", lw=1)
        axes[0].set_title("autoencoder stage | diffusion stage" if stage_change else "autoencoder stage")
        fig.tight_layout()
        with atomic_path(self.folder / "progress.png", suffix=".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)

    def write_json(self, name: str, obj: object) -> None:
        if self.active:
            write_json(obj, self.folder / name)
