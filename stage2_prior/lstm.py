"""The layers of PixelRNN (van den Oord et al. 2016a): the Row LSTM (sec. 3.1) and the Diagonal BiLSTM
(sec. 3.2), with residual connections (sec. 3.3), and their per-position steps for cached sampling.

Gates i, f, o are sigmoids and g a tanh: c = f * c_prev + i * g, h = o * tanh(c). Labels add a
per-layer bias to the 4C gate pre-activations and a condition map a per-layer 1x1 projection of it
(as in the gated arch). Each layer's output is its input plus a 1x1 of h (sec. 3.3). The full forward
runs the recurrence the paper's way: the Row LSTM a row at a time (one convolution along the row per
step), the Diagonal BiLSTM a column of the skewed map at a time. `row_lstm_chain` and
`diagonal_bilstm_chain` are one position through every layer, for the cached states in
`stage2_prior.archs.pixelrnn`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stage2_prior.layers import shift_down


def lstm_cell(gates: torch.Tensor, cell: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM update (sec. 3.1): gate pre-activations (..., 4C, ...) split along `dim` as
    i, f, o, g, and the previous cell state (..., C, ...) -> (h, c)."""
    input_gate, forget_gate, output_gate, candidate = gates.chunk(4, dim=dim)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(input_gate) * torch.tanh(candidate)
    return torch.sigmoid(output_gate) * torch.tanh(cell), cell


def skew(x: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w) -> (B, K, h, w + h - 1): row i shifted right by i, zeros elsewhere (sec. 3.2)."""
    height, width = x.shape[2:]
    flat = rearrange(F.pad(x, (0, height)), "b k h w -> b k (h w)")  # row i starts at i * (w + h)
    return rearrange(flat[:, :, :height * (width + height - 1)], "b k (h t) -> b k h t", h=height)


def unskew(x: torch.Tensor, width: int) -> torch.Tensor:
    """The inverse of `skew`: (B, K, h, w + h - 1) -> (B, K, h, w)."""
    height = x.shape[2]
    flat = F.pad(rearrange(x, "b k h t -> b k (h t)"), (0, height))  # row i now starts at i * (w + h)
    return rearrange(flat, "b k (h t) -> b k h t", h=height)[..., :width]


def row_lstm_chain(features: torch.Tensor, left_inputs: torch.Tensor, row_terms: torch.Tensor,
                   cells_above: torch.Tensor, input_weights: torch.Tensor, out_weights: list[torch.Tensor],
                   out_biases: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The Row LSTM state's per-position step: the first convolution's features (B, C) at (i, j) through
    every layer. Per layer (stacked on a first dimension L): its inputs at columns j - r .. j - 1
    (L, B, r, C), its row terms (L, B, 4C) and the cell above (L, B, C). Returns the features (B, C)
    and, per layer, its input, h and c at (i, j) (3 x (L, B, C))."""
    layer_inputs, hiddens, cells = [], [], []
    for index, (weight, bias) in enumerate(zip(out_weights, out_biases)):
        layer_inputs.append(features)
        window = torch.cat([left_inputs[index].flatten(1), features], dim=1)  # (B, (r + 1) C): columns j - r .. j
        gates = torch.addmm(row_terms[index], window, input_weights[index])  # (B, 4C)
        hidden, cell = lstm_cell(gates, cells_above[index])  # 2 x (B, C)
        hiddens.append(hidden)
        cells.append(cell)
        features = features + F.linear(hidden, weight, bias)  # sec. 3.3
    return features, torch.stack(layer_inputs), torch.stack(hiddens), torch.stack(cells)


def diagonal_bilstm_chain(features: torch.Tensor, row_terms: torch.Tensor, hidden_before: torch.Tensor,
                          cells_before: torch.Tensor, backward_above: torch.Tensor, input_weights: torch.Tensor,
                          before_weights: torch.Tensor, out_weights: list[torch.Tensor],
                          out_biases: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The Diagonal BiLSTM state's per-position step: the first convolution's features (B, C) at (i, j)
    through every layer. Per layer (stacked on L): its row terms (L, B, 4C), the left-to-right h and c
    at (i, j - 1) and the right-to-left h of the row above at j (3 x (L, B, C)). Returns the features
    (B, C) and, per layer, its input, left-to-right h and c at (i, j) (3 x (L, B, C))."""
    layer_inputs, hiddens, cells = [], [], []
    for index, (weight, bias) in enumerate(zip(out_weights, out_biases)):
        layer_inputs.append(features)
        gates = torch.addmm(row_terms[index], features, input_weights[index])  # (B, 4C)
        gates = torch.addmm(gates, hidden_before[index], before_weights[index])  # from (i, j - 1)
        hidden, cell = lstm_cell(gates, cells_before[index], dim=-1)  # 2 x (B, C)
        hiddens.append(hidden)
        cells.append(cell)
        both = hidden + backward_above[index]  # sec. 3.2: right-to-left shifted down a row
        features = features + F.linear(both, weight, bias)  # sec. 3.3
    return features, torch.stack(layer_inputs), torch.stack(hiddens), torch.stack(cells)


class GateBiases(nn.Module):
    """What one LSTM adds to every position's 4C gate pre-activations: a class bias (with the null
    class) and a 1x1 projection of the condition features."""

    def __init__(self, channels: int, label_rows: int, conditioned: bool) -> None:
        super().__init__()
        self.class_bias = nn.Embedding(label_rows, 4 * channels) if label_rows else None
        self.condition_bias = nn.Conv2d(channels, 4 * channels, 1) if conditioned else None

    def forward(self, gates: torch.Tensor, labels: torch.Tensor | None,
                condition: torch.Tensor | None) -> torch.Tensor:
        """gates (B, 4C, h, w) plus the biases."""
        if self.class_bias is not None:
            gates = gates + self.class_bias(labels)[:, :, None, None]  # (B, 4C, 1, 1)
        if self.condition_bias is not None:
            gates = gates + self.condition_bias(condition)  # (B, 4C, h, w)
        return gates


class RowLSTMLayer(nn.Module):
    """One Row LSTM layer with its residual connection: x (B, C, h, w) -> x + 1x1(h) (sec. 3.1, 3.3).

    Input-to-state: a 1 x k convolution along the row, mask B (columns j - k//2 .. j of x at row i).
    State-to-state: a 1 x k convolution of the row above's hidden state (columns j - k//2 .. j + k//2).
    The cell recurrence runs down each column: c[i, j] = f * c[i - 1, j] + i * g.
    """

    def __init__(self, channels: int, kernel_size: int, label_rows: int, conditioned: bool, dropout: float) -> None:
        super().__init__()
        half = kernel_size // 2
        self.dropout = dropout
        self.input_to_state = nn.Conv2d(channels, 4 * channels, (1, kernel_size), padding=(0, half))
        mask = torch.ones(1, 1, 1, kernel_size)
        mask[..., half + 1:] = 0  # mask B: the column itself and those left of it
        self.register_buffer("mask", mask, persistent=False)
        self.state_to_state = nn.Conv1d(channels, 4 * channels, kernel_size, padding=half, bias=False)
        self.biases = GateBiases(channels, label_rows, conditioned)
        self.out = nn.Conv2d(channels, channels, 1)

    def input_weight(self) -> torch.Tensor:
        return self.input_to_state.weight * self.mask  # (4C, C, 1, k)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        inputs = F.conv2d(x, self.input_weight(), self.input_to_state.bias, padding=self.input_to_state.padding)
        inputs = self.biases(inputs, labels, condition)  # (B, 4C, h, w)
        hidden = x.new_zeros(batch, channels, width)  # the row above row 0: zero states
        cell = x.new_zeros(batch, channels, width)
        rows = []
        for row in range(height):  # sec. 3.1: the whole row in one step, rows one after another
            gates = inputs[:, :, row] + self.state_to_state(hidden)  # (B, 4C, w)
            hidden, cell = lstm_cell(gates, cell)  # 2 x (B, C, w)
            rows.append(hidden)
        hidden = torch.stack(rows, dim=2)  # (B, C, h, w)
        return x + F.dropout(self.out(hidden), self.dropout, self.training)  # sec. 3.3


class DiagonalLSTM(nn.Module):
    """One direction of a Diagonal BiLSTM (sec. 3.2): x (B, C, h, w) -> hidden states (B, C, h, w).

    Input-to-state: a 1x1 convolution (mask B on features that exclude the position is no mask at all).
    The map is skewed (row i shifted right by i) and a column-wise LSTM runs left to right over it; its
    state-to-state map is a 2 x 1 convolution over the previous column's states at rows i - 1 and i,
    which are (i - 1, j) and (i, j - 1) in the unskewed grid. States outside the grid are zero.
    """

    def __init__(self, channels: int, label_rows: int, conditioned: bool, reads_codes: bool = False) -> None:
        super().__init__()
        self.input_to_state = nn.Conv2d(channels, 4 * channels, 1)
        self.state_to_state = nn.Conv1d(channels, 4 * channels, 2, bias=False)  # taps: rows i - 1, i
        self.biases = GateBiases(channels, label_rows, conditioned)
        # the right-to-left direction also reads the embedded codes at its own position (see DiagonalBiLSTMLayer)
        self.code_to_state = nn.Conv2d(channels, 4 * channels, 1, bias=False) if reads_codes else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None,
                codes: torch.Tensor | None = None) -> torch.Tensor:
        batch, channels, height, width = x.shape
        gates = self.input_to_state(x)
        if self.code_to_state is not None:
            gates = gates + self.code_to_state(codes)
        inputs = skew(self.biases(gates, labels, condition))  # (B, 4C, h, w + h - 1)
        inside = skew(x.new_ones(1, 1, height, width))[0, 0]  # (h, w + h - 1): 1 on the grid, 0 on padding
        hidden = x.new_zeros(batch, channels, height)
        cell = x.new_zeros(batch, channels, height)
        columns = []
        for column in range(inputs.shape[3]):  # sec. 3.2: one diagonal of the grid per step
            above_and_left = self.state_to_state(F.pad(hidden, (1, 0)))  # (B, 4C, h): rows i - 1 and i
            hidden, cell = lstm_cell(inputs[..., column] + above_and_left, cell)  # 2 x (B, C, h)
            # zero outside the grid, so (i, -1) and (-1, j) hold the zero initial state, as when sampling
            hidden, cell = hidden * inside[:, column], cell * inside[:, column]
            columns.append(hidden)
        return unskew(torch.stack(columns, dim=3), width)  # (B, C, h, w)


class DiagonalBiLSTMLayer(nn.Module):
    """A Diagonal BiLSTM layer with its residual connection (sec. 3.2, 3.3): the left-to-right direction,
    plus the right-to-left one (the same layer on the mirrored map, with its own weights) shifted down
    one row, so that nothing at or after (i, j) reaches (i, j); x + 1x1 of their sum.

    The right-to-left direction also reads the embedded codes at its own position: its output reaches
    row i only from row i - 1, where every code is known. Without that, the last code of row i - 1
    would be hidden from most of row i: the layers' input (mask A) carries it only to row i's last
    columns, which come later in raster order.
    """

    def __init__(self, channels: int, label_rows: int, conditioned: bool, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout
        self.left_to_right = DiagonalLSTM(channels, label_rows, conditioned)
        self.right_to_left = DiagonalLSTM(channels, label_rows, conditioned, reads_codes=True)
        self.out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, condition: torch.Tensor | None,
                codes: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, h, w): the layer input; codes (B, C, h, w): the embedded codes."""
        mirrored_condition = None if condition is None else condition.flip(3)
        right_to_left = self.right_to_left(x.flip(3), labels, mirrored_condition,
                                           codes.flip(3)).flip(3)  # (B, C, h, w)
        hidden = self.left_to_right(x, labels, condition) + shift_down(right_to_left)  # sec. 3.2
        return x + F.dropout(self.out(hidden), self.dropout, self.training)  # sec. 3.3
