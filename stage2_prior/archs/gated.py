"""Gated PixelCNN (arch "gated") and the original masked PixelCNN (arch "pixelcnn"), with the exact
incremental state of the gated stack for the cached sampler.

The cached computation (after Fast PixelCNN++, Ramachandran et al. 2017, sec. 3): the vertical stack
at row i needs only rows < i, so it is computed a row at a time, one small conv per layer, as soon
as the row above is complete; what it adds to the horizontal stack (the vertical-to-horizontal link,
the biases) is kept for the row. Per position, each layer's horizontal window is split into the
columns already drawn (for every layer at once: one batched product per tap) and the current column
(a chain through the layers: one product, one tanh, one multiply-add and one output product each).
The gate tanh(a) * sigmoid(b) is computed as tanh(a) * (1 + tanh(b / 2)) / 2 with the halves folded
into the weights, and the skip outputs of all layers are summed by one product at the end. In the
plain stack the horizontal stream also drops its biases (their products are constants per column,
added to the row terms), so a layer's residual update is one product. Each layer's vertical conv at
the row start is one product over the row's unfolded windows (float64 conv2d is slow on CPU).
"""
from __future__ import annotations

import torch
from torch import nn

from stage2_prior.conditioning import Conditioning
from stage2_prior.incremental import IncrementalState
from stage2_prior.layers import GatedBlock, MaskedConv2d, MaskedResidualBlock
from stage2_prior.prior import Prior
from stage2_prior.registry import ArchSpec, ConvolutionOptions, register_arch


class GatedPixelCNN(Prior):
    """Gated PixelCNN (arch="gated") or the original masked PixelCNN (arch="pixelcnn") over codes.

    `forward(codes (B, h, w), labels (B,) or None)` -> logits (B, vocab_size, h, w); the logits at
    raster position p depend only on codes at positions < p (and the label, and the condition map).
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        channels, groups, kernel = config.hidden_channels, config.channel_groups, config.options.kernel_size
        conditioned = config.condition_vocab_size is not None
        if config.arch == "pixelcnn":
            self.first = MaskedConv2d(channels, channels, kernel, "A", groups)
            self.blocks = nn.ModuleList(
                MaskedResidualBlock(channels, kernel, self.label_rows, config.dropout, groups, conditioned)
                for _ in range(config.num_layers - 1))
        else:
            self.blocks = nn.ModuleList(
                GatedBlock(channels, kernel, self.label_rows, first=index == 0, dropout=config.dropout,
                           groups=groups, condition=conditioned)
                for index in range(config.num_layers))

    def state_class(self) -> type[IncrementalState] | None:
        return None if self.config.arch == "pixelcnn" else GatedState  # the masked stack has no cached sampler

    def network(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        labels, condition = conditioning.labels, conditioning.code_map
        if self.config.arch == "pixelcnn":
            features = self.first(x)
            for block in self.blocks:
                features = block(features, labels, condition)
            return features
        vertical, horizontal, skips = x, x, 0
        for index, block in enumerate(self.blocks):
            vertical, horizontal, skip = block(vertical, horizontal, labels, condition)
            horizontal = self.after_block(index, horizontal, x)
            skips = skips + skip
        return skips  # (B, C, h, w)

    def after_block(self, index: int, horizontal: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """What follows gated block `index` on the horizontal stream (B, C, h, w) (PixelSNAIL: attention);
        `embedded` (B, C, h, w) are the network's input codes."""
        return horizontal

    def after_block_hook(self, state: "GatedState", codes: torch.Tensor, row: int, column: int) -> tuple | None:
        """The same for one position, incrementally: None, or (function, arguments) that `gated_chain`
        calls as function(index, horizontal (B, C), *arguments). A module-level function and its
        arguments, not a closure, so that a compiled chain sees the same function at every position."""
        return None


def gated_chain(base: torch.Tensor, here: torch.Tensor | None, centres: list, residual_weights: list,
                residual_biases: list | None, skip_weights: torch.Tensor, skip_bias: torch.Tensor,
                after_block: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One position through every gated layer, as a function of tensors of fixed shapes (so that it
    can be compiled, or captured in a CUDA graph): base (L, B, 2C) holds each layer's row terms and
    drawn columns, `here` (B, C) the position's own embedding (channel groups only). Returns the
    horizontal outputs (L - 1, B, C) that later positions read and the skip sum (B, C).
    `residual_biases` None: the stream carries no biases (`GatedState.column_constants` adds their
    products to `base`), so each layer's update is one product added to the stream."""
    previous, outputs, gated_all = None, [], []
    for index, centre in enumerate(centres):
        if index == 0:
            pre = base[0] if centre is None else torch.addmm(base[0], here, centre)
        else:
            pre = torch.addmm(base[index], previous, centre)
        squashed = torch.tanh(pre)  # the sigmoid half's weights are halved: sigmoid(b) = (1 + tanh(b / 2)) / 2
        tanh_a, tanh_b = squashed.chunk(2, dim=1)
        gated = torch.addcmul(tanh_a, tanh_a, tanh_b)  # 2 * gate(pre)
        gated_all.append(gated)
        if residual_biases is None:
            horizontal = (torch.mm(gated, residual_weights[index]) if previous is None
                          else torch.addmm(previous, gated, residual_weights[index]))
        else:
            residual = torch.addmm(residual_biases[index], gated, residual_weights[index])
            horizontal = residual if previous is None else previous + residual
        if after_block is not None:  # the arch's hook (PixelSNAIL: attention), see `after_block_hook`
            function, arguments = after_block
            horizontal = function(index, horizontal, *arguments)
        if index + 1 < len(centres):
            outputs.append(horizontal)
        previous = horizontal
    skips = torch.addmm(skip_bias, torch.cat(gated_all, dim=1), skip_weights)  # (B, C)
    if not outputs:
        return base.new_zeros(0, base.shape[1], skip_bias.shape[0]), skips
    return torch.stack(outputs), skips


class GatedState(IncrementalState):
    """Incremental state of a gated stack (see the module docstring). Tensors keep the batch on the
    dimension `reorder` names."""

    chain = staticmethod(gated_chain)
    graph_inputs = ("position_tensor", "attention_keys", "attention_values", "centres", "residual_weights",
                    "chain_biases", "skip_weights", "skip_bias")

    def __init__(self, model: GatedPixelCNN, batch: int, conditioning: Conditioning) -> None:
        super().__init__(model.device)
        labels, condition_features = conditioning.labels, conditioning.code_map
        config = model.config
        self.model = model
        blocks = model.blocks
        channels, half = config.hidden_channels, config.options.kernel_size // 2
        height, width = config.latent_shape
        device, dtype = model.device, model.embedding.weight.dtype
        self.channels, self.half, self.width = channels, half, width
        self.row = -1
        layers = len(blocks)
        self.class_terms = [block.class_bias(labels) if block.class_bias is not None else None for block in blocks]
        self.condition_terms = [block.condition_bias(condition_features).permute(0, 2, 3, 1)
                                if block.condition_bias is not None else None for block in blocks]  # (B, h, w, 2C)
        # Vertical inputs of every layer, padded as the full forward pads them, channels last (a row's window
        # is then one matrix product): (B, half + h, half + w + half, C). Layer 0's input is the embedded
        # codes shifted one row down, so its row i holds code row i - 1.
        self.vertical_inputs = [torch.zeros(batch, half + height, width + 2 * half, channels, device=device,
                                            dtype=dtype) for _ in blocks]
        # Column-major, so that one column's (L, B, ...) slice is contiguous: batched products over a
        # strided slice run several times slower on CPU (float64 baddbmm: 240 us against 41 us).
        self.row_base = torch.zeros(width, layers, batch, 2 * channels, device=device, dtype=dtype)
        # Inputs of each layer's horizontal conv on the current row; index c + half + 1 holds column c.
        self.horizontal = torch.zeros(width + half + 1, layers, batch, channels, device=device, dtype=dtype)
        self.base: torch.Tensor | None = None  # (L, B, 2C): row terms + the drawn columns, per layer
        self.attention_keys: list[torch.Tensor] = []  # used by archs that add attention (PixelSNAIL)
        self.attention_values: list[torch.Tensor] = []
        # the arch's per-position hook after each layer (PixelSNAIL's attention); the plain stack has none
        self.has_after_block = type(model).after_block_hook is not GatedPixelCNN.after_block_hook
        self._prepare_weights(blocks)

    def step(self, codes: torch.Tensor, row: int, column: int, depth: int) -> torch.Tensor:
        if column == 0 and depth == 0 and row != self.row:
            self.start_row(codes, row)
        if depth == 0:
            self.start_position(codes, row, column)
        return self.features_here(codes, row, column)

    def _prepare_weights(self, blocks) -> None:
        """Matrices of the per-position chain. Rows of the sigmoid half are halved: sigmoid(b) =
        (1 + tanh(b / 2)) / 2, so one tanh serves both halves; the output products take the / 2."""
        channels, half = self.channels, self.half
        scale = torch.ones(2 * channels, device=self.row_base.device, dtype=self.row_base.dtype)
        scale[channels:] = 0.5
        self.scale = scale
        # Tap t reads column j - half - 1 + t. Layer 0's input is shifted one column right, so its weight
        # index t' = t; later layers read their own column with the centre, so their index is t - 1, and
        # tap 0 (the farthest column) belongs to layer 0 alone.
        weights = [block.horizontal_weight()[:, :, 0] for block in blocks]  # (2C, C, half + 1): t' reads j - half + t'
        self.first_tap = (weights[0][:, :, 0] * scale[:, None]).t().contiguous()  # (C, 2C), layer 0 only
        self.taps = [torch.stack([(weight[:, :, t if index == 0 else t - 1] * scale[:, None]).t()
                                  for index, weight in enumerate(weights)])
                     for t in range(1, half + 1)]  # taps 1 .. half, every layer: (L, C, 2C)
        self.centres = []  # (C, 2C) per layer: the current column's input (layer 0: only with channel groups)
        for index, block in enumerate(blocks):
            if index == 0:
                centre = block.centre.matrix if block.centre is not None else None
            else:
                centre = block.horizontal_weight()[:, :, 0, half]
            self.centres.append(None if centre is None else (centre * scale[:, None]).t().contiguous())
        out = [block.horizontal_out.matrix for block in blocks]  # (2C, C): residual rows, then skip rows
        self.residual_weights = [(0.5 * matrix[:channels]).t().contiguous() for matrix in out]  # (C, C)
        residual_biases = [block.horizontal_out.bias[:channels] for block in blocks]
        self.skip_weights = torch.cat([0.5 * matrix[channels:] for matrix in out], dim=1).t().contiguous()  # (L*C, C)
        self.skip_bias = torch.stack([block.horizontal_out.bias[channels:] for block in blocks]).sum(0)
        # The row start: each layer's vertical conv as one product over the row's unfolded windows (a float64
        # conv2d took 1.7 ms against 0.9 ms at batch 16), the columns of a window ordered (row, column, channel);
        # and the vertical-to-horizontal 1x1 with the horizontal conv's bias, scaled as the taps are.
        self.vertical_matrices = [block.vertical.weight.permute(2, 3, 1, 0).flatten(0, 2).contiguous()
                                  for block in blocks]  # ((half + 1) k C, 2C)
        self.link_matrices = [(block.vertical_to_horizontal.weight[:, :, 0, 0] * scale[:, None]).t().contiguous()
                              for block in blocks]  # (2C, 2C)
        self.link_biases = [(block.vertical_to_horizontal.bias + block.horizontal.bias) * scale for block in blocks]
        # Without a per-layer hook the stream can drop its biases: it carries h_i - (b_0 + ... + b_i), and
        # what the biases would add to the next layers' products (the centre every column, a tap only at
        # columns inside the row, where the full forward does not read zero padding) is a constant per
        # column and layer, added to the row terms once per row. One op fewer per layer and position.
        self.chain_biases = residual_biases if self.has_after_block else None  # what gated_chain adds
        self.column_constants = None  # (w, L, 1, 2C) when the biases are folded
        if not self.has_after_block:
            stream_biases = torch.stack(residual_biases).cumsum(0)  # (L, C): b_0 + ... + b_i
            constants = torch.zeros(self.width, len(blocks), 2 * channels, device=scale.device, dtype=scale.dtype)
            for index in range(1, len(blocks)):  # layer `index` reads the stream of layer index - 1
                carried = stream_biases[index - 1]  # (C,)
                constants[:, index] += carried @ self.centres[index]
                for t in range(1, half + 1):  # tap t reads column c - half - 1 + t: inside the row from c = half + 1 - t
                    constants[half + 1 - t:, index] += carried @ self.taps[t - 1][index]
            self.column_constants = constants[:, :, None]  # (w, L, 1, 2C)

    def start_row(self, codes: torch.Tensor, row: int) -> None:
        """The vertical stack of every layer for `row`, and what it adds to the horizontal stack there."""
        model, half, width, channels = self.model, self.half, self.width, self.channels
        batch, kernel = codes.shape[0], 2 * half + 1
        if row > 0:
            self.vertical_inputs[0][:, half + row, half:half + width] = model.embed_stack(codes[:, row - 1])  # (B, w, C)
        for index, block in enumerate(model.blocks):
            windows = self.vertical_inputs[index][:, row:row + half + 1].unfold(2, kernel, 1)  # (B, half + 1, w, C, k)
            windows = windows.permute(0, 2, 1, 4, 3).reshape(batch * width, -1)  # (B w, (half + 1) k C)
            vertical_pre = torch.addmm(block.vertical.bias, windows, self.vertical_matrices[index])  # (B w, 2C)
            term = torch.addmm(self.link_biases[index], vertical_pre, self.link_matrices[index]).view(batch, width, -1)
            vertical_pre = vertical_pre.view(batch, width, 2 * channels)
            bias = None  # (B, 1 or w, 2C): class and condition terms, which the full forward adds after the link
            if self.class_terms[index] is not None:
                bias = self.class_terms[index][:, None]
            if self.condition_terms[index] is not None:
                condition_term = self.condition_terms[index][:, row]
                bias = condition_term if bias is None else bias + condition_term
            if bias is not None:
                term = term + bias * self.scale
                vertical_pre = vertical_pre + bias
            self.row_base[:, index] = term.transpose(0, 1)  # (w, B, 2C)
            if index + 1 < len(model.blocks):
                a, b = vertical_pre.chunk(2, dim=-1)
                self.vertical_inputs[index + 1][:, half + row, half:half + width] = torch.tanh(a) * torch.sigmoid(b)
        if self.column_constants is not None:
            self.row_base += self.column_constants
        self.horizontal.zero_()
        self.row = row

    def start_position(self, codes: torch.Tensor, row: int, column: int) -> None:
        """Take in the code just left of `column`, then every layer's product with the drawn columns."""
        if column > 0:  # layer 0's horizontal input is the embedded codes shifted one column right
            self.horizontal[column + self.half, 0] = self.model.embed_stack(codes[:, row, column - 1])  # (B, C)
        base = self.row_base[column]  # (L, B, 2C)
        for t, tap in enumerate(self.taps, start=1):  # one batched product per tap over the layers
            base = torch.baddbmm(base, self.horizontal[column + t], tap)
        base[0].addmm_(self.horizontal[column, 0], self.first_tap)  # base is a new tensor: half >= 1 taps above
        self.base = base

    def features_here(self, codes: torch.Tensor, row: int, column: int) -> torch.Tensor:
        """The chain through the layers at the current column: skips (B, C)."""
        model = self.model
        here = None
        if self.centres[0] is not None:  # the position's own lower groups (channel groups only)
            here = model.embed_stack(codes[:, row, column])  # (B, C)
        after_block = None
        if self.has_after_block:
            after_block = model.after_block_hook(self, codes, row, column)
        outputs, skips = self.chain(self.base, here, self.centres, self.residual_weights, self.chain_biases,
                                    self.skip_weights, self.skip_bias, after_block)
        self.horizontal[column + self.half + 1, 1:] = outputs  # what later positions' windows read
        return skips

    def reorder(self, index: torch.Tensor) -> None:
        self.vertical_inputs = [tensor[index] for tensor in self.vertical_inputs]
        self.row_base = self.row_base[:, :, index]
        self.horizontal = self.horizontal[:, :, index]
        self.base = None if self.base is None else self.base[:, index]
        self.class_terms = [None if term is None else term[index] for term in self.class_terms]
        self.condition_terms = [None if term is None else term[index] for term in self.condition_terms]
        for tensor in self.attention_keys + self.attention_values:
            tensor.copy_(tensor[index])  # in place: CUDA graphs read the caches at fixed addresses


register_arch(ArchSpec(
    "gated", GatedPixelCNN, "Gated PixelCNN (van den Oord et al. 2016b): no blind spot, exact cached sampler",
    options=ConvolutionOptions, channel_groups=True, recipe=dict(num_layers=15),
    tiny=dict(hidden_channels=12, num_layers=4)))
register_arch(ArchSpec(
    "pixelcnn", GatedPixelCNN, "the original masked PixelCNN stack (van den Oord et al. 2016a): a blind spot, "
    "naive sampling only", options=ConvolutionOptions, channel_groups=True, recipe=dict(num_layers=15),
    tiny=dict(hidden_channels=12, num_layers=4)))
