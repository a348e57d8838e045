"""What each primitive computes, declared once: the tables every rule is derived from.

An operator's output y is multilinear in its *linear* operands (x and weight for the depthwise
ops, x for the columns, data for nd_linear_sample) and nonlinear in the positions (offset and
rotation, or coord). Every mode is one *slot* of a multilinear *form*

    <cot, y_form(x, weight, tangent; offset, rotation)>

computed from the other slots: the slot "y" is the form itself (its operand is then `cot`), a
linear slot is the gradient in that operand. The forms are the forward and its derivatives in
the positions (`jvp_rotation` = d forward / d rotation along a tangent, ...), each linear in its
tangent too. So a mode is declared by its form and its slot; from that follow

  - its operands (every slot of the form but its own, as roles, with the positions),
  - the roles it is linear in (those slots) and its transpose in each (the mode computing that
    slot: `transpose`),
  - its derivative in a position (the same slot of the form's derivative: `derivative`),
  - and how it is written on the jax.numpy reference (`as_derivative`).

Adding a mode is one `Mode` line here and one row of DK_MODES in xla_ffi/dk_targets.h (the
library's list, from which its enum, operand predicates, handlers and target names are
generated), plus its arithmetic; a new form is one `Form` (and its `dk::Form`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Geometry(NamedTuple):
    """The static geometry of a depthwise or columns call, filled in one place
    (`ops._depthwise_geometry`, and `ops._cols_geometry` for the scope) and passed to the
    custom call as one named attribute per field (read by `dk::Geometry` in
    xla_ffi/dk_common.h). The scope is the columns' (0 for the depthwise ops,
    whose weight has it)."""

    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    rotation_groups: int
    scope_h: int = 0
    scope_w: int = 0

    def scope(self) -> tuple[int, int]:
        return (self.scope_h, self.scope_w)

    def kwargs(self) -> dict:
        """As the keyword arguments of the reference ops."""
        return dict(
            kernel_size=(self.kernel_h, self.kernel_w),
            stride=(self.stride_h, self.stride_w),
            padding=(self.pad_h, self.pad_w),
            dilation=(self.dilation_h, self.dilation_w),
            rotation_groups=self.rotation_groups,
        )


@dataclass(frozen=True)
class Form:
    """A multilinear form of a family.

    tangent: what its tangent slot is the tangent of ("rotation", "offset", "coord"), or "cross"
      (the second-order cross tangent, one number per group and tap); None: no tangent slot.
    derivative: how its y is a derivative of another form's y: ("jvp", position, form) or
      ("cross", position, form); None for the forward.
    derivatives: position -> (form, how) giving its derivative there, how its tangent enters:
      "tangent" (the direction s is the new form's tangent) or "cross" (the new tangent is the
      cross of this form's tangent t with s); None where that derivative is zero. A position
      not listed is differentiated on the reference.
    """

    name: str
    tangent: str | None = None
    derivative: tuple | None = None
    derivatives: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Mode:
    name: str
    form: str
    slot: str  # "y", a linear operand, or "tangent"


@dataclass(frozen=True)
class Family:
    """A family of primitives sharing operand roles and rules.

    order: every role, in the operands' fixed order. linear_operands: the linear operands of
    the forward. positions: the nonlinear ones; `batch` the role whose leading axis is the batch.
    shared: the operand that may be one for the whole batch (leading axis 1), or None.
    kind: the middle of the primitive and target names.
    """

    name: str
    order: tuple
    linear_operands: tuple
    positions: tuple
    batch: str
    shared: str | None
    forms: dict
    modes: dict
    kind: str

    # --- declarations -------------------------------------------------------------------

    def slots(self, form: str) -> tuple:
        tangent = ("tangent",) if self.forms[form].tangent else ()
        return ("y", *self.linear_operands, *tangent)

    def mode_of(self, form: str, slot: str) -> str | None:
        """The mode computing `slot` of `form`, or None where no kernel computes it."""
        return next((m.name for m in self.modes.values() if (m.form, m.slot) == (form, slot)), None)

    def takes_offset(self, mode: str) -> bool:
        """Whether a mode exists only for the deformable ops (it involves the offset tangent)."""
        return self.forms[self.modes[mode].form].tangent == "offset"

    # --- derived --------------------------------------------------------------------------

    def roles(self, mode: str, deformable: bool = True) -> tuple:
        """The operands of `mode`, in the fixed order (offset only when deformable)."""
        m = self.modes[mode]
        present = {("cot" if s == "y" else s) for s in self.slots(m.form) if s != m.slot}
        present |= set(self.positions)
        if not deformable:
            present.discard("offset")
        return tuple(r for r in self.order if r in present)

    def linear(self, mode: str) -> tuple:
        """The roles `mode` is linear in: every slot of its form but its own."""
        return tuple(r for r in self.roles(mode) if r not in self.positions)

    def output(self, mode: str) -> str:
        """What `mode` returns: "y", a linear operand, or the kind of its form's tangent."""
        m = self.modes[mode]
        return self.forms[m.form].tangent if m.slot == "tangent" else m.slot

    @staticmethod
    def shape_param(output: str) -> str | None:
        """The static param carrying the output's shape where no operand has it."""
        return {"x": "image_shape", "weight": "weight_shape", "data": "data_shape"}.get(output)

    def transpose(self, mode: str, role: str) -> tuple | None:
        """(mode computing the cotangent of linear `role`, the role the output cotangent takes
        there, its shape param), or None where no kernel computes it."""
        m = self.modes[mode]
        slot = "y" if role == "cot" else role
        target = self.mode_of(m.form, slot)
        if target is None:
            return None
        return target, "cot" if m.slot == "y" else m.slot, self.shape_param(self.output(target))

    def derivative(self, mode: str, role: str) -> tuple | None | str:
        """The derivative of `mode` in position `role`: (mode, how), None where it is zero, or
        "reference" where no kernel computes it. how: "tangent", "cross", or "cross_grad" (the
        mode computes the gradient g of the cross tangent; the derivative is g * d(cross)/dt)."""
        m = self.modes[mode]
        derivatives = self.forms[m.form].derivatives
        if role not in derivatives:
            return "reference"
        if derivatives[role] is None:
            return None
        form, how = derivatives[role]
        target = self.mode_of(form, m.slot)
        if target is None:
            return "reference"
        return target, "cross_grad" if how == "cross" and m.slot == "tangent" else how

    def as_derivative(self, mode: str) -> tuple | None:
        """`mode` as a transformation of another: (how, role, mode, shape param of the zero
        primal where the mode does not take that role, or "cross"); None for the forward.
        how: "jvp", "vjp" or "cross". The reference versions of the modes are built from it."""
        m = self.modes[mode]
        form = self.forms[m.form]
        if m.slot == "y":
            if form.derivative is None:
                return None
            how, role, of = form.derivative
            return how, role, self.mode_of(of, "y"), None
        if m.slot != "tangent":
            return "vjp", m.slot, self.mode_of(m.form, "y"), self.shape_param(m.slot)
        how, role, of = form.derivative
        if how == "jvp":  # the gradient in the position itself
            return "vjp", role, self.mode_of(of, "y"), None
        return "vjp", "tangent", self.mode_of(m.form, "y"), "cross"

    def primitive_name(self, mode: str) -> str:
        return f"dk_{self.kind}{mode}"

    def target(self, mode: str, deformable: bool) -> str:
        """The custom-call target, without the version suffix (DK_TARGETS, xla_ffi/dk_targets.h)."""
        if self.name == "nd":
            return f"dk_nd_{mode}"
        return f"dk_{'deform' if deformable else 'sample'}_{self.kind}{mode}"

    def targets(self) -> list:
        """Every target name of the family (sample and deform variants), unversioned."""
        if self.name == "nd":
            return [self.target(m, False) for m in self.modes]
        return [
            self.target(m, deformable)
            for deformable in (False, True)
            for m in self.modes
            if deformable or not self.takes_offset(m)
        ]


def _modes(*rows) -> dict:
    return {name: Mode(name, form, slot) for name, form, slot in rows}


# The forms of the depthwise and columns families. Within a cell the kernel's bilinear read is
# linear in each coordinate, so its second derivative in rotation is the cross term and the
# third vanishes: hvp_rotation's derivative in rotation is zero.
_POSITION_FORMS = {
    "forward": Form(
        "forward",
        derivatives={"rotation": ("jvp_rotation", "tangent"), "offset": ("jvp_offset", "tangent")},
    ),
    "jvp_rotation": Form(
        "jvp_rotation",
        tangent="rotation",
        derivative=("jvp", "rotation", "forward"),
        derivatives={"rotation": ("hvp_rotation", "cross")},
    ),
    "jvp_offset": Form("jvp_offset", tangent="offset", derivative=("jvp", "offset", "forward")),
    "hvp_rotation": Form(
        "hvp_rotation",
        tangent="cross",
        derivative=("cross", "rotation", "jvp_rotation"),
        derivatives={"rotation": None},
    ),
}

DK = Family(
    name="dk",
    order=("cot", "x", "offset", "rotation", "weight", "tangent"),
    linear_operands=("x", "weight"),
    positions=("offset", "rotation"),
    batch="rotation",
    shared="weight",
    forms=_POSITION_FORMS,
    modes=_modes(
        ("forward", "forward", "y"),
        ("grad_image", "forward", "x"),
        ("grad_weight", "forward", "weight"),
        ("jvp_rotation", "jvp_rotation", "y"),
        ("grad_rotation", "jvp_rotation", "tangent"),
        ("jvp_offset", "jvp_offset", "y"),
        ("grad_offset", "jvp_offset", "tangent"),
        ("jvp_rotation_grad_image", "jvp_rotation", "x"),
        ("jvp_rotation_grad_weight", "jvp_rotation", "weight"),
        ("hvp_rotation", "hvp_rotation", "y"),
        ("hvp_rotation_grad_image", "hvp_rotation", "x"),
        ("hvp_rotation_grad_weight", "hvp_rotation", "weight"),
        ("grad_cross_rotation", "hvp_rotation", "tangent"),
    ),
    kind="",
)

# Scope-space im2col: columns (N, Ho, Wo, Sh, Sw, C), linear in x; geometry carries (Sh, Sw).
COLS = Family(
    name="cols",
    order=("cot", "x", "offset", "rotation", "tangent"),
    linear_operands=("x",),
    positions=("offset", "rotation"),
    batch="rotation",
    shared=None,
    forms=_POSITION_FORMS,
    # The depthwise modes without those computing the weight's gradient.
    modes={name: m for name, m in DK.modes.items() if m.slot != "weight"},
    kind="cols_",
)

# nd_linear_sample: data (Nb, *S, C), coord (Nb, M, D); second derivatives on the reference.
ND = Family(
    name="nd",
    order=("cot", "data", "coord", "tangent"),
    linear_operands=("data",),
    positions=("coord",),
    batch="coord",
    shared="data",
    forms={
        "forward": Form("forward", derivatives={"coord": ("jvp_coord", "tangent")}),
        "jvp_coord": Form("jvp_coord", tangent="coord", derivative=("jvp", "coord", "forward")),
    },
    modes=_modes(
        ("forward", "forward", "y"),
        ("grad_data", "forward", "data"),
        ("jvp_coord", "jvp_coord", "y"),
        ("grad_coord", "jvp_coord", "tangent"),
    ),
    kind="nd_",
)

FAMILIES = (DK, COLS, ND)
