"""PixelRNN (van den Oord et al. 2016a): the Row LSTM (arch "row_lstm", sec. 3.1) and the Diagonal
BiLSTM (arch "diagonal_bilstm", sec. 3.2), with residual connections (sec. 3.3), and their exact
incremental state for the cached sampler.

Both start with a k x k convolution of mask A (sec. 3.4), so the features at (i, j) know only codes
before (i, j); each LSTM layer then reads its input at (i, j) (mask B) and states that already only
know earlier positions. Gates i, f, o are sigmoids and g a tanh: c = f * c_prev + i * g, h = o * tanh(c).
Labels add a per-layer bias to the 4C gate pre-activations and a condition map a per-layer 1x1
projection of it (as in the gated arch). Each layer's output is its input plus a 1x1 of h (sec. 3.3).

The full forward runs the recurrence the paper's way: the Row LSTM a row at a time (one convolution
along the row per step), the Diagonal BiLSTM a column of the skewed map at a time.

The cached state carries the recurrence instead of recomputing it. The first convolution's rows
above are computed once per row, its current-row taps per position. Row LSTM: each layer keeps h and
c of the row above (their state-to-state term is computed once per row) and its inputs on the current
row (the masked 1 x k window). Diagonal BiLSTM: each layer keeps the left-to-right states of the row
above and of the position to the left; when a row completes, the right-to-left pass over it runs for
every layer at once (it feeds only the next rows, after the shift down).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage2_prior.conditioning import Conditioning
from stage2_prior.incremental import IncrementalState
from stage2_prior.layers import MaskedConv2d
from stage2_prior.lstm import (DiagonalBiLSTMLayer, DiagonalLSTM, GateBiases, RowLSTMLayer, diagonal_bilstm_chain,
                               lstm_cell, row_lstm_chain)
from stage2_prior.prior import Prior
from stage2_prior.registry import ArchSpec, ConvolutionOptions, register_arch


class PixelRNN(Prior):
    """PixelRNN over codes: a k x k convolution of mask A, then `num_layers` residual Row LSTM
    (arch="row_lstm") or Diagonal BiLSTM (arch="diagonal_bilstm") layers of C = hidden_channels.

    The features at raster position p depend only on codes before p. Receptive fields (r = k // 2,
    L layers): the Diagonal BiLSTM's covers every earlier position (its right-to-left direction reads
    the codes of the row above directly; see DiagonalBiLSTMLayer). The Row LSTM's is a triangle (sec.
    3.1): row i - d (d >= 1) at columns j - (d + L + 1) r .. j + d r, and row i at columns
    j - (L + 1) r .. j - 1; the rest of the past stays hidden.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        channels, kernel = config.hidden_channels, config.options.kernel_size
        conditioned = config.condition_vocab_size is not None
        self.first = MaskedConv2d(channels, channels, kernel, "A")  # sec. 3.4: the first layer
        if config.arch == "row_lstm":
            self.layers = nn.ModuleList(
                RowLSTMLayer(channels, kernel, self.label_rows, conditioned, config.dropout)
                for _ in range(config.num_layers))
        else:
            self.layers = nn.ModuleList(DiagonalBiLSTMLayer(channels, self.label_rows, conditioned, config.dropout)
                                        for _ in range(config.num_layers))

    def network(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        labels, condition = conditioning.labels, conditioning.code_map
        features = self.first(x)  # (B, C, h', w)
        for layer in self.layers:
            if isinstance(layer, DiagonalBiLSTMLayer):
                features = layer(features, labels, condition, codes=x)
            else:
                features = layer(features, labels, condition)
        return features

    # ------------------------------------------------------------------------------------------
    # The cached state
    # ------------------------------------------------------------------------------------------

    def state_class(self) -> type[IncrementalState]:
        return RowLSTMState if self.config.arch == "row_lstm" else DiagonalBiLSTMState


class PixelRNNState(IncrementalState):
    """What both cached states share: the embedded codes drawn so far and the first convolution,
    whose rows above are computed once per row and whose current-row taps once per position."""

    def __init__(self, model: PixelRNN, batch: int, conditioning: Conditioning) -> None:
        super().__init__(model.device)
        config = model.config
        channels, half = config.hidden_channels, config.options.kernel_size // 2
        height, width = config.latent_shape
        self.model, self.half, self.height, self.width = model, half, height, width
        self.device, self.dtype = model.device, model.embedding.weight.dtype
        self.layer_count = len(model.layers)
        # Code (a, b) at [a + half, b + half]; the rest is the first convolution's zero padding.
        self.embedded = self.zeros(batch, channels, half + height, width + 2 * half)
        weight = model.first.weight * model.first.mask  # (C, C, k, k)
        self.first_above = weight[:, :, :half]  # (C, C, r, k): rows i - r .. i - 1
        self.first_left = rearrange(weight[:, :, half, :half], "o c t -> (c t) o")  # (C r, C): columns j - r .. j - 1
        self.first_row = self.zeros(batch, channels, width)  # the rows-above part of the current row, with bias
        self.condition_features = conditioning.code_map  # (B, C, h, w) or None
        self.features: torch.Tensor | None = None
        self.out_weights = [layer.out.weight[:, :, 0, 0] for layer in model.layers]  # (C, C) each
        self.out_biases = [layer.out.bias for layer in model.layers]  # (C,) each

    def step(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        """The features at (row, column); the head orders the stack, so the sampler asks at depth 0 only."""
        self.take_previous(codes, row, column)
        if column == 0:
            self.start_row(row)
        self.features = self.position(row, column)
        return self.features

    def zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, device=self.device, dtype=self.dtype)

    def class_terms(self, biases: list[GateBiases], labels: torch.Tensor | None) -> torch.Tensor | None:
        """(L, B, 4C) class bias of each layer's gates, or None."""
        if labels is None or biases[0].class_bias is None:
            return None
        return torch.stack([bias.class_bias(labels) for bias in biases])

    def condition_terms(self, biases: list[GateBiases]) -> torch.Tensor | None:
        """(L, B, h, w, 4C) condition projection of each layer's gates, or None."""
        if self.condition_features is None:
            return None
        return torch.stack([rearrange(bias.condition_bias(self.condition_features), "b g h w -> b h w g")
                            for bias in biases])

    def take_previous(self, codes: torch.Tensor, row: int, column: int) -> None:
        """Embed the code drawn last, the one just before (row, column) in raster order."""
        position = row * self.width + column
        if position == 0:
            return
        a, b = divmod(position - 1, self.width)
        here = self.model.embed_stack(codes[:, a, b])  # (B, C)
        self.embedded[:, :, a + self.half, b + self.half] = here

    def start_row(self, row: int) -> None:
        """The first convolution over rows row - r .. row - 1 for the whole row."""
        above = self.embedded[:, :, row:row + self.half]  # (B, C, r, w + 2r)
        self.first_row = F.conv2d(above, self.first_above, self.model.first.bias)[:, :, 0]  # (B, C, w)

    def first_features(self, row: int, column: int) -> torch.Tensor:
        """The first convolution (mask A) at (row, column): (B, C)."""
        left = self.embedded[:, :, row + self.half, column:column + self.half]  # (B, C, r): columns j - r .. j - 1
        return torch.addmm(self.first_row[:, :, column], left.flatten(1), self.first_left)

    def position(self, row: int, column: int) -> torch.Tensor:  # pragma: no cover - every state overrides it
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        self.embedded = self.embedded[index]
        self.first_row = self.first_row[index]
        self.condition_features = None if self.condition_features is None else self.condition_features[index]
        self.features = None if self.features is None else self.features[index]


class RowLSTMState(PixelRNNState):
    """Row LSTM: per layer, h and c of the row above, the state-to-state term they give the current
    row (computed once per row), and the layer's inputs on the current row (its 1 x k window).
    Per-layer tensors are stacked on a first dimension L; the batch is the second."""

    chain = staticmethod(row_lstm_chain)
    graph_inputs = ("input_weights", "out_weights", "out_biases")

    def __init__(self, model: PixelRNN, batch: int, conditioning: Conditioning) -> None:
        super().__init__(model, batch, conditioning)
        labels = conditioning.labels
        channels, half, width, layers = model.config.hidden_channels, self.half, self.width, self.layer_count
        biases = [layer.biases for layer in model.layers]
        self.classes = self.class_terms(biases, labels)  # (L, B, 4C) or None
        self.conditions = self.condition_terms(biases)  # (L, B, h, w, 4C) or None
        # input-to-state over columns j - r .. j, as one matrix on the flattened window: (L, (r + 1) C, 4C)
        self.input_weights = torch.stack([rearrange(layer.input_weight()[:, :, 0, :half + 1], "g c t -> (t c) g")
                                          for layer in model.layers])
        self.input_biases = torch.stack([layer.input_to_state.bias for layer in model.layers])  # (L, 4C)
        self.inputs = self.zeros(layers, batch, half + width, channels)  # column j at j + r; left padding zero
        self.hidden_above = self.zeros(layers, batch, width, channels)  # row i - 1
        self.cells_above = self.zeros(layers, batch, width, channels)
        self.hidden_row = self.zeros(layers, batch, width, channels)  # row i, filled position by position
        self.cells_row = self.zeros(layers, batch, width, channels)
        self.row_terms = self.zeros(layers, batch, width, 4 * channels)

    def start_row(self, row: int) -> None:
        super().start_row(row)
        if row > 0:
            self.hidden_above, self.hidden_row = self.hidden_row, self.hidden_above
            self.cells_above, self.cells_row = self.cells_row, self.cells_above
        for index, layer in enumerate(self.model.layers):
            above = layer.state_to_state(rearrange(self.hidden_above[index], "b w c -> b c w"))  # (B, 4C, w)
            terms = rearrange(above, "b g w -> b w g") + self.input_biases[index]  # (B, w, 4C)
            if self.classes is not None:
                terms = terms + self.classes[index][:, None]
            if self.conditions is not None:
                terms = terms + self.conditions[index][:, row]
            self.row_terms[index] = terms

    def position(self, row: int, column: int) -> torch.Tensor:
        half = self.half
        features, inputs, hidden, cell = self.chain(
            self.first_features(row, column), self.inputs[:, :, column:column + half], self.row_terms[:, :, column],
            self.cells_above[:, :, column], self.input_weights, self.out_weights, self.out_biases)
        self.inputs[:, :, column + half] = inputs  # (L, B, C)
        self.hidden_row[:, :, column] = hidden
        self.cells_row[:, :, column] = cell
        return features  # (B, C)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.classes = None if self.classes is None else self.classes[:, index]
        self.conditions = None if self.conditions is None else self.conditions[:, index]
        for name in ("inputs", "hidden_above", "cells_above", "hidden_row", "cells_row", "row_terms"):
            setattr(self, name, getattr(self, name)[:, index])


class DiagonalBiLSTMState(PixelRNNState):
    """Diagonal BiLSTM: per layer, the left-to-right states from (i - 1, j) (the row above, whose
    state-to-state term is computed once per row) and from (i, j - 1) (h, and the cell c); the
    right-to-left states of the row above, which (shifted down) position (i, j) adds; and the layer's
    inputs on the current row, which the right-to-left pass reads when the row completes.
    Per-layer tensors are stacked on a first dimension L; the batch is the second."""

    chain = staticmethod(diagonal_bilstm_chain)
    graph_inputs = ("forward_weights", "out_weights", "out_biases")

    def __init__(self, model: PixelRNN, batch: int, conditioning: Conditioning) -> None:
        super().__init__(model, batch, conditioning)
        labels = conditioning.labels
        channels, width, layers = model.config.hidden_channels, self.width, self.layer_count
        forward = [layer.left_to_right for layer in model.layers]
        backward = [layer.right_to_left for layer in model.layers]

        def matrices(directions: list[DiagonalLSTM]) -> tuple[torch.Tensor, ...]:
            """(L, C, 4C) input-to-state, state-to-state from the row above, from the previous column; (L, 4C) bias."""
            inputs = torch.stack([d.input_to_state.weight[:, :, 0, 0].t() for d in directions])
            above = torch.stack([d.state_to_state.weight[:, :, 0].t() for d in directions])
            before = torch.stack([d.state_to_state.weight[:, :, 1].t() for d in directions])
            return inputs, above, before, torch.stack([d.input_to_state.bias for d in directions])

        self.forward_weights = matrices(forward)
        self.backward_weights = matrices(backward)
        self.code_weights = torch.stack([d.code_to_state.weight[:, :, 0, 0].t() for d in backward])  # (L, C, 4C)
        self.forward_classes = self.class_terms([d.biases for d in forward], labels)  # (L, B, 4C) or None
        self.backward_classes = self.class_terms([d.biases for d in backward], labels)
        self.forward_conditions = self.condition_terms([d.biases for d in forward])  # (L, B, h, w, 4C) or None
        self.backward_conditions = self.condition_terms([d.biases for d in backward])
        self.inputs = self.zeros(layers, batch, width, channels)  # the layers' inputs on the current row
        self.forward_above = self.zeros(layers, batch, width, channels)  # left-to-right h of row i - 1
        self.forward_row = self.zeros(layers, batch, width + 1, channels)  # of row i: column j at j + 1, zero at 0
        self.forward_cell = self.zeros(layers, batch, channels)  # left-to-right c at (i, j - 1)
        self.backward_above = self.zeros(layers, batch, width, channels)  # right-to-left h of row i - 1
        self.row_terms = self.zeros(layers, batch, width, 4 * channels)

    def finish_row(self, row: int) -> None:
        """The right-to-left pass over the completed `row`, every layer at once, right to left."""
        inputs, above, before, bias = self.backward_weights
        codes = self.embedded[:, :, row + self.half, self.half:self.half + self.width].transpose(1, 2)  # (B, w, C)
        gates = (torch.matmul(self.inputs, inputs[:, None]) + torch.matmul(self.backward_above, above[:, None])
                 + torch.matmul(codes, self.code_weights[:, None]) + bias[:, None, None])  # (L, B, w, 4C)
        if self.backward_classes is not None:
            gates = gates + self.backward_classes[:, :, None]
        if self.backward_conditions is not None:
            gates = gates + self.backward_conditions[:, :, row]
        hidden = torch.zeros_like(self.backward_above[:, :, 0])  # (L, B, C): the zero state right of the grid
        cell = torch.zeros_like(hidden)
        states = torch.empty_like(self.backward_above)
        for column in reversed(range(self.width)):
            hidden, cell = lstm_cell(torch.baddbmm(gates[:, :, column], hidden, before), cell, dim=-1)
            states[:, :, column] = hidden
        self.backward_above = states

    def start_row(self, row: int) -> None:
        super().start_row(row)
        if row > 0:
            self.finish_row(row - 1)
            self.forward_above = self.forward_row[:, :, 1:].clone()
        _, above, _, bias = self.forward_weights
        terms = torch.matmul(self.forward_above, above[:, None]) + bias[:, None, None]  # (L, B, w, 4C)
        if self.forward_classes is not None:
            terms = terms + self.forward_classes[:, :, None]
        if self.forward_conditions is not None:
            terms = terms + self.forward_conditions[:, :, row]
        self.row_terms = terms
        self.forward_cell.zero_()  # the zero state left of the grid

    def position(self, row: int, column: int) -> torch.Tensor:
        inputs, _, before, _ = self.forward_weights
        features, layer_inputs, hidden, cell = self.chain(
            self.first_features(row, column), self.row_terms[:, :, column], self.forward_row[:, :, column],
            self.forward_cell, self.backward_above[:, :, column], inputs, before, self.out_weights, self.out_biases)
        self.inputs[:, :, column] = layer_inputs  # (L, B, C)
        self.forward_row[:, :, column + 1] = hidden
        self.forward_cell.copy_(cell)
        return features  # (B, C)

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        for name in ("forward_classes", "backward_classes", "forward_conditions", "backward_conditions"):
            tensor = getattr(self, name)
            setattr(self, name, None if tensor is None else tensor[:, index])
        for name in ("inputs", "forward_above", "forward_row", "forward_cell", "backward_above", "row_terms"):
            setattr(self, name, getattr(self, name)[:, index])


register_arch(ArchSpec(
    "row_lstm", PixelRNN, "PixelRNN's Row LSTM (van den Oord et al. 2016a, sec. 3.1): a triangular receptive field",
    options=ConvolutionOptions, recipe=dict(num_layers=4), tiny=dict(hidden_channels=8, num_layers=2)))
register_arch(ArchSpec(
    "diagonal_bilstm", PixelRNN, "PixelRNN's Diagonal BiLSTM (sec. 3.2): every position sees every earlier one",
    options=ConvolutionOptions, full_context=True, recipe=dict(num_layers=4),
    tiny=dict(hidden_channels=8, num_layers=2)))
