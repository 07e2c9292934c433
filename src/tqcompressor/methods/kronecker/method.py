"""The ``kronecker`` method: W ≈ P (Σ Aᵢ ⊗ Bᵢ) Q with the permutations P, Q searched, for linear layers
and (as kron(E', b)[:, p]) for embedding tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ...linalg import calibrated_error, fisher_loss, ridged_output_metric, weighted_error
from ...statistics import InputStats, TokenStats
from ..base import CompressionMethod, Estimate, FitReport, MethodConfig
from ..registry import register
from ..targets import LINEAR_TYPES, dense_weight, relative_error
from .calibrated import calibrated_factors, kronecker_whitened, row_scaled_factors
from .factors import KroneckerFactors, nearest_kronecker
from .modules import KroneckerEmbedding, KroneckerLinear
from .search import search_permutations
from .shapes import KroneckerShape, propose_kronecker_shape

# 15 s per layer: the GPT-2 small preset (14 searched matrices) then compresses in minutes on 2 cores;
# at 60 s the search used its whole budget on every layer and took 12.7 minutes (benchmarks/speed.py).
SEARCH_DEFAULTS = {"iterations": 6, "restarts": 0, "seed": 0, "time_budget": 15.0}
# Offered to a budget: linear layers at these ratios of their parameters, embeddings divided by these.
ESTIMATE_RATIOS = (0.5, 0.25, 0.125)
ESTIMATE_EMBEDDING_FACTORS = (2, 4, 8)
# A permuted candidate is priced by a search bounded by work, not time: a 0.5 s budget made plans depend
# on machine load. Matrices of up to ESTIMATE_FULL_SEARCH_WEIGHTS get the configured search in full
# (under 0.6 s; it recovers planted structure that short searches miss), larger ones one round of the
# `slot` move from each structured start. House teacher, 36 candidates: 7.8 s against the clock's 19.9 s,
# lower error in 15, higher (by up to 2%) in 8: the clock usually stopped inside the identity start,
# missing orders the cluster start finds (block 3 c_attn at ½: squared calibrated error 0.11 against
# 0.27). Adding the `assign` move cost 2.8x the time and lowered no estimate by 1%. The fit it stands
# for tries the estimate's order too, so the estimate bounds the installed error from above.
ESTIMATE_FULL_SEARCH_WEIGHTS = 1 << 14
ESTIMATE_QUICK_SEARCH = {"iterations": 1, "moves": ("slot",)}


@dataclass
class KroneckerConfig(MethodConfig):
    """Linear layers: ``shape`` [m1, n1, m2, n2] with ``rank`` Kronecker terms (default 1), or a target
    ``ratio`` of the dense parameters (factor shapes proposed, with at most ``max_rank`` terms, default 4).
    Embeddings: ``embedding_factor`` k, vocab x d -> (vocab x d/k ⊗ 1 x k)[:, p]; on an already
    compressed embedding it divides the inner width again (the paper's ÷2 then ÷2).
    ``permute``: search permutations of both sides (true), "rows", "cols" or none (false); embeddings
    permute their columns only. ``iterations``, ``restarts``, ``seed``, ``time_budget`` (seconds per
    layer) tune the search, default 6, 0, 0, 15. A search out of time stops where it is, so on a busy
    machine the same plan can fit differently; ``time_budget`` inf lets ``iterations`` alone end it."""

    method = "kronecker"
    shape: tuple[int, int, int, int] | None = None
    rank: int | None = None
    ratio: float | None = None
    max_rank: int | None = None
    embedding_factor: int | None = None
    permute: bool | Literal["rows", "cols"] = True
    iterations: int | None = None
    restarts: int | None = None
    seed: int | None = None
    time_budget: float | None = None

    def check(self) -> None:
        if self.shape is not None:
            if len(self.shape) != 4:
                raise ValueError(f"field 'shape' must be [m1, n1, m2, n2], got {self.shape}")
            self.shape = tuple(int(x) for x in self.shape)  # type: ignore[assignment]
        forms = [name for name in ("shape", "ratio", "embedding_factor") if getattr(self, name) is not None]
        if len(forms) != 1:
            given = f"got {' and '.join(forms)}" if forms else "got none"
            raise ValueError(f"give exactly one of 'shape', 'ratio' or 'embedding_factor' ({given})")
        if self.rank is not None and self.shape is None:
            raise ValueError(
                "field 'rank' (the number of Kronecker terms) applies with 'shape'; with 'ratio' use 'max_rank'"
            )
        if self.max_rank is not None and self.ratio is None:
            raise ValueError("field 'max_rank' applies with 'ratio' only")
        for name in ("rank", "max_rank", "iterations"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"field {name!r} must be a positive integer, got {value!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"field 'ratio' must be in (0, 1], got {self.ratio}")
        if self.time_budget is not None and not (isinstance(self.time_budget, (int, float)) and self.time_budget >= 0):
            raise ValueError(
                "field 'time_budget' must be a non-negative number of seconds (.inf: no limit), "
                f"got {self.time_budget!r}"
            )
        if self.embedding_factor is not None and (
            not isinstance(self.embedding_factor, int) or self.embedding_factor < 2
        ):
            raise ValueError(
                f"field 'embedding_factor' must be an integer of at least 2, got {self.embedding_factor!r}"
            )
        if self.permute not in (True, False, "rows", "cols"):
            raise ValueError(f"field 'permute' must be true, false, 'rows' or 'cols', got {self.permute!r}")
        if self.permute is False:
            for name in SEARCH_DEFAULTS:
                if getattr(self, name) is not None:
                    raise ValueError(f"field {name!r} tunes the permutation search, which 'permute: false' turns off")

    def search_settings(self) -> dict[str, Any]:
        return {
            name: default if getattr(self, name) is None else getattr(self, name)
            for name, default in SEARCH_DEFAULTS.items()
        }

    def linear_shape(self, rows: int, cols: int) -> KroneckerShape:
        """Factor shapes for a rows x cols weight: the given ``shape`` (checked) or one proposed from ``ratio``."""
        if self.embedding_factor is not None:
            raise ValueError("field 'embedding_factor' applies to embeddings, not to linear layers")
        if self.shape is None:
            return propose_kronecker_shape(rows, cols, self.ratio, max_rank=self.max_rank or 4)
        shape = KroneckerShape(*self.shape, rank=self.rank or 1)
        shape.check_matrix(rows, cols)
        return shape

    def embedding_width(self, width: int) -> int:
        """The inner width after dividing a table of ``width`` columns by ``embedding_factor``."""
        if self.embedding_factor is None:
            raise ValueError("an embedding needs field 'embedding_factor' ('shape' and 'ratio' apply to linear layers)")
        if self.permute == "rows":
            raise ValueError("field 'permute': an embedding's rows are tokens and are never permuted; use 'cols'")
        if width % self.embedding_factor:
            raise ValueError(f"embedding width {width} is not divisible by embedding_factor {self.embedding_factor}")
        return width // self.embedding_factor


def _embedding_target(module: nn.Module) -> tuple[torch.Tensor, KroneckerEmbedding | None]:
    """(the table to factor, the compressed embedding it is the base of, if any)."""
    if isinstance(module, KroneckerEmbedding):
        return module.base, module
    if isinstance(module, nn.Embedding):
        return module.weight, None
    raise ValueError(f"a {type(module).__name__} cannot be compressed by method 'kronecker'")


class KroneckerMethod(CompressionMethod):
    name = "kronecker"
    config_class = KroneckerConfig
    modules = (KroneckerLinear, KroneckerEmbedding)

    def plan(self, module: nn.Module, config: KroneckerConfig) -> KroneckerLinear | KroneckerEmbedding:
        if isinstance(module, LINEAR_TYPES):
            weight, bias, layout = dense_weight(module)
            s = config.linear_shape(*weight.shape)
            return KroneckerLinear.from_spec(
                {"shape": [s.m1, s.n1, s.m2, s.n2, s.rank], "layout": layout, "bias": bias is not None}
            )
        if isinstance(module, (nn.Embedding, KroneckerEmbedding)):
            table, inner_of = _embedding_target(module)
            vocab, width = table.shape
            outer = [] if inner_of is None else [s.numel() for s in inner_of.scales]
            spec = {
                "vocab": vocab,
                "base_dim": config.embedding_width(width),
                "factors": [config.embedding_factor, *outer],
            }
            return KroneckerEmbedding.from_spec(spec)
        raise ValueError(
            f"a {type(module).__name__} cannot be compressed by method 'kronecker' "
            "(it takes nn.Linear, Conv1D, nn.Embedding and its own KroneckerEmbedding)"
        )

    def parameters(self, config: KroneckerConfig, rows: int, cols: int) -> int:
        if config.embedding_factor is not None:
            return rows * config.embedding_width(cols) + config.embedding_factor
        return config.linear_shape(rows, cols).num_params

    def estimates(self, module: nn.Module, stats: InputStats | TokenStats) -> list[Estimate]:
        if isinstance(module, nn.Embedding):
            return self._embedding_estimates(module, stats)
        if not isinstance(module, LINEAR_TYPES):
            return []
        weight = dense_weight(module)[0].detach()
        c, g = stats.second_moment.double(), stats.output_second_moment
        metric = None if g is None else ridged_output_metric(g)

        def priced(config: KroneckerConfig, params: int, fits: list[KroneckerFactors]) -> Estimate:
            """The best of ``fits`` on the objective they were fitted to, with its KL under the Fisher
            where there is one (the refinement takes the Fisher as G₁ ⊗ G₂: an estimate, not a bound)."""
            approximation = min((f.reconstruct() for f in fits), key=lambda w: _fit_objective(weight, w, c, metric))
            kl = None if g is None else fisher_loss(weight, approximation, c, g)
            return Estimate(config, params, calibrated_error(weight, approximation, c) ** 2, kl)

        found = []
        for ratio in ESTIMATE_RATIOS:
            try:
                shape = propose_kronecker_shape(*weight.shape, ratio)
            except ValueError:
                continue
            fields = {"shape": (shape.m1, shape.n1, shape.m2, shape.n2), "rank": shape.rank}
            # The closed-form start in the identity order: the installed fit starts there too and refines.
            plain = _closed_forms(weight, shape, c, metric)
            found.append(priced(KroneckerConfig(**fields, permute=False), shape.num_params, plain))
            if shape.n2 == 1:
                continue  # no column order to search
            # One of the orders the installed fit tries (columns searched on the Kronecker-whitened W),
            # before its refinement: the fit keeps its best refined order, so on C alone it lands at or
            # below this.
            config = KroneckerConfig(**fields)
            columns = self._whitened_columns(weight, shape, c, config)
            permuted = _closed_forms(weight, shape, c, metric, columns)
            found.append(priced(config, shape.num_params, plain + permuted))
        return found

    def _embedding_estimates(self, module: nn.Embedding, stats: TokenStats) -> list[Estimate]:
        """Fitted outright on the calibrated objective (tied head included) in the identity order and the
        estimate's column search: cheap, since B is 1 x k, and an upper bound of the installed fit, which
        tries those orders too."""
        vocab, width = module.weight.shape
        found = []
        for factor in ESTIMATE_EMBEDDING_FACTORS:
            if width % factor:
                continue
            config = KroneckerConfig(embedding_factor=factor)
            _, report = self._fit_embedding(module, config, stats, estimate=True)
            found.append(Estimate(config, self.parameters(config, vocab, width), report.error**2))
        return found

    def fit(self, module: nn.Module, config: KroneckerConfig, stats: InputStats | TokenStats | None = None):
        if isinstance(module, LINEAR_TYPES):
            if stats is None:
                return self._fit_linear(module, config)
            return self._fit_linear_calibrated(module, config, stats)
        return self._fit_embedding(module, config, stats)

    def _search(
        self,
        weight: torch.Tensor,
        shape: KroneckerShape,
        config: KroneckerConfig,
        rows: bool = True,
        share: int = 1,
        estimate: bool = False,
    ):
        """The configured search, or with ``estimate`` the budget's deterministic one; ``share`` splits
        the layer's time budget between that many searches."""
        settings = config.search_settings()
        if estimate:
            settings["time_budget"] = None
            if weight.numel() > ESTIMATE_FULL_SEARCH_WEIGHTS:
                settings.update(ESTIMATE_QUICK_SEARCH)
        else:
            settings["time_budget"] /= share
        return search_permutations(
            weight,
            shape,
            rows=rows and config.permute in (True, "rows"),
            cols=config.permute in (True, "cols"),
            **settings,
        )

    def _whitened_columns(
        self, weight: torch.Tensor, shape: KroneckerShape, c: torch.Tensor, config: KroneckerConfig
    ) -> torch.Tensor:
        """The column order the estimate's search finds on the Kronecker-whitened W (whitening by S₁ ⊗ S₂
        keeps W's columns, so the order applies to W)."""
        whitened, _, _ = kronecker_whitened(weight, c, shape.m1, shape.m2)
        return self._search(whitened, shape, config, rows=False, estimate=True).factors.col_perm

    def _fit_linear(self, module: nn.Module, config: KroneckerConfig) -> tuple[KroneckerLinear, FitReport]:
        weight, bias, layout = dense_weight(module)
        shape = config.linear_shape(*weight.shape)
        result = self._search(weight, shape, config)
        layer = KroneckerLinear(result.factors, bias, layout)
        report = FitReport(
            list(weight.shape),
            shape.describe(),
            result.relative_error,
            result.plain_relative_error,
            result.best_trial.start,
        )
        return layer, report

    def _fit_linear_calibrated(
        self, module: nn.Module, config: KroneckerConfig, stats: InputStats
    ) -> tuple[KroneckerLinear, FitReport]:
        """Fit on the calibration objective from each candidate order and keep the best: identity, the
        order the Frobenius search finds, a column order searched on the Kronecker-whitened W, and the
        orders searched on W with each input row scaled by its RMS on the calibration inputs (the
        diagonal of C: a whitening that, unlike S₁ ⊗ S₂, commutes with permuting the inputs), and the
        column order a budget's estimate priced, so on C alone the fit never lands above its estimate. With a Fisher
        output metric in ``stats`` the best is the one lowest on the Fisher objective (``_fit_objective``)."""
        weight, bias, layout = dense_weight(module)
        shape = config.linear_shape(*weight.shape)
        c, g = stats.second_moment, stats.output_second_moment
        metric = None if g is None else ridged_output_metric(g)
        fitted: dict[str, tuple[KroneckerFactors, list[float]]] = {}

        def fit(name: str, row_perm: torch.Tensor | None = None, col_perm: torch.Tensor | None = None) -> None:
            # With the Fisher, also fitted on both metrics: the refinement takes G as G₁ ⊗ G₂, which can
            # miss the Fisher's real shape, so the exact objective decides between the two.
            fitted[name] = calibrated_factors(weight, shape, c, row_perm, col_perm)
            if metric is not None:
                fitted[f"{name}, Fisher"] = calibrated_factors(
                    weight, shape, c, row_perm, col_perm, output_metric=metric
                )

        fit("identity")
        details = {"frobenius_fit": calibrated_error(weight, nearest_kronecker(weight, shape).reconstruct(), c)}
        if config.permute is not False:
            searches = 1 + (config.permute in (True, "cols")) + (config.permute in (True, "rows"))
            frobenius = self._search(weight, shape, config, share=searches)
            details["frobenius_fit_permuted"] = calibrated_error(weight, frobenius.factors.reconstruct(), c)
            order = frobenius.factors
            fit("frobenius-search", order.row_perm, order.col_perm)
            if config.permute in (True, "cols"):
                whitened, _, _ = kronecker_whitened(weight, c, shape.m1, shape.m2)
                for name, estimate in (("whitened-columns", False), ("estimate-columns", True)):
                    found = self._search(whitened, shape, config, rows=False, share=searches, estimate=estimate)
                    fit(name, None, found.factors.col_perm)
            if config.permute in (True, "rows"):
                scale = c.diagonal().clamp_min(0).sqrt().to(weight)[:, None]
                scaled = self._search(scale * weight, shape, config, share=searches).factors
                fit("scaled-search", scaled.row_perm, scaled.col_perm)
        approximations = {name: f.reconstruct() for name, (f, _) in fitted.items()}
        best = min(approximations, key=lambda name: _fit_objective(weight, approximations[name], c, metric))
        errors = {name: calibrated_error(weight, approximation, c) for name, approximation in approximations.items()}
        factors, history = fitted[best]
        details.update(closed_form=fitted["identity"][1][0], sweeps=float(len(history) - 1))
        details.update({f"order_{name}": error for name, error in errors.items()})
        if g is not None:
            details["kl"] = fisher_loss(weight, approximations[best], c, g)
        report = FitReport(
            list(weight.shape),
            shape.describe(),
            errors[best],
            errors["identity"],
            best,
            objective="calibrated",
            details=details,
        )
        return KroneckerLinear(factors, bias, layout), report

    def _fit_embedding(
        self, module: nn.Module, config: KroneckerConfig, stats: TokenStats | None, estimate: bool = False
    ) -> tuple[KroneckerEmbedding, FitReport]:
        """Column orders from the search on the frequency-weighted table (and, calibrated, the identity
        order and the one a budget's estimate priced, so the fit never lands above its estimate); for
        each, the factors minimising the calibrated objective (``_embedding_metric``); the best kept."""
        dense = module.weight.detach()
        table, inner_of = _embedding_target(module)
        target = table.detach()
        vocab, width = target.shape
        k = config.embedding_factor
        shape = KroneckerShape(vocab, config.embedding_width(width), 1, k, 1)
        # Token-frequency weights scale rows; a row scale keeps kron(E', b) structure and column orders.
        scale = None if stats is None else stats.weights().sqrt().to(target)[:, None]
        weighted = target if scale is None else scale * target
        search = self._search(weighted, shape, config, rows=False, estimate=estimate)
        orders = {"identity": nearest_kronecker(weighted, shape), "search": search.factors}
        if stats is not None and not estimate and config.permute is not False:
            # A time-bounded search can end short of the order the estimate found.
            orders["estimate-search"] = self._search(weighted, shape, config, rows=False, estimate=True).factors
        metric = _embedding_metric(stats, inner_of)
        if metric is not None:  # each order is kept; its b only starts the search for the new b
            orders = row_scaled_factors(target, k, metric, stats.weights(), orders)
        elif scale is not None:
            for factors in orders.values():
                factors.a = factors.a / scale
        if stats is None:
            measure = lambda table: relative_error(table, dense)  # noqa: E731
        else:
            weights, head = stats.weights(), stats.head_second_moment
            measure = lambda table: weighted_error(dense, table, weights, head)  # noqa: E731
        # Errors against the embedding being replaced, so a second ÷k is reported like the first.
        layers = {name: KroneckerEmbedding.from_factors(f, inner_of=inner_of) for name, f in orders.items()}
        errors = {name: measure(layer.weight) for name, layer in layers.items()}
        best = min(errors, key=errors.get)
        layer = layers[best].to(dense.device)
        report = FitReport(
            list(dense.shape),
            f"{vocab}x{width // k} ⊗ 1x{k}",
            errors[best],
            errors["identity"],
            search.best_trial.start if best == "search" else best,
            objective="frobenius" if stats is None else "calibrated",
            details={} if stats is None else {"frobenius": relative_error(layer.weight, dense)},
        )
        return layer, report


def _closed_forms(
    weight: torch.Tensor,
    shape: KroneckerShape,
    c: torch.Tensor,
    metric: torch.Tensor | None,
    col_perm: torch.Tensor | None = None,
) -> list[KroneckerFactors]:
    """The closed-form calibrated starts in one order: on C alone and, with a Fisher ``metric``, on both."""
    metrics = [None] if metric is None else [None, metric]
    return [calibrated_factors(weight, shape, c, None, col_perm, iterations=0, output_metric=m)[0] for m in metrics]


def _fit_objective(
    weight: torch.Tensor, approximation: torch.Tensor, c: torch.Tensor, metric: torch.Tensor | None
) -> float:
    """What the fits minimise, to choose among them: the calibrated error, or under ``metric`` the
    Fisher loss."""
    if metric is None:
        return calibrated_error(weight, approximation, c)
    return fisher_loss(weight, approximation, c, metric)


def _embedding_metric(stats: TokenStats | None, inner_of: KroneckerEmbedding | None) -> torch.Tensor | None:
    """What prices an error Δ in the table being factored: a tied head's logit error Δ_v C Δ_vᵀ, carried
    through the outer stages O that expand the table to the embedding (÷k again): O C Oᵀ. None without
    a tied head: then the metric is O Oᵀ, a multiple of the identity (every base column feeds k outputs
    scaled by the same b), which the frequency-weighted Van Loan fit already minimises."""
    if stats is None or stats.head_second_moment is None:
        return None
    c = stats.head_second_moment.double()
    if inner_of is None:
        return c
    with torch.no_grad():
        return inner_of.reduce(inner_of.reduce(c).T.contiguous())


register(KroneckerMethod())
