"""Reading SASS (kernels/sass.py) on small hand-written listings, in nvdisasm's and cuobjdump's forms."""

from triton_workbench.kernels import sass

# nvdisasm -c: labels; a pipelined HGMMA loop; after EXIT a barrier retry that branches back into the loop
NVDISASM = """
//--------------------- .text.k --------------------------
        .section        .text.k,"ax",@progbits
k:
.text.k:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64], P1 ;
        /*0030*/                   WARPGROUP.ARRIVE ;
        /*0040*/                   UIADD3 UR4, UR4, 0x1, URZ ;
.L_x_3:
        /*0050*/                   HGMMA.64x128x16.F32 R24, gdesc[UR8].tnspB, R24 ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0070*/               @P1 BRA `(.L_x_1) ;
.L_x_0:
        /*0080*/              @!P2 LDG.E R5, desc[UR4][R6.64] ;
        /*0090*/                   UTMALDG.2D [UR8], [UR14], desc[UR16] ;
        /*00a0*/                   STG.E.128 desc[UR4][R8.64], R12 ;
        /*00b0*/                   EXIT ;
.L_x_4:
        /*00c0*/                   BRA `(.L_x_3) ;
.L_x_2:
        /*00d0*/                   BRA `(.L_x_2);
"""

# cuobjdump -sass: addresses as branch targets, encodings beside and below each instruction
CUOBJDUMP = """
        code for sm_80
                Function : k
        .headerflags    @"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM80"
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;   /* 0x00000a00ff017624 */
                                                                             /* 0x000fc400078e00ff */
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;          /* 0x0000000c0804723c */
        /*0020*/                   HMMA.1688.F32.TF32 R16, R8, R12, R16 ;    /* 0x0000000c0810723c */
        /*0030*/                   LDG.E.U16 R2, [R2.64] ;                   /* 0x0000000402027981 */
        /*0040*/               @P0 BRA 0x10 ;                                /* 0xfffffffc00000947 */
        /*0050*/                   LDGSTS.E.64 [R3], [R4.64] ;               /* 0x0000000004037fae */
        /*0060*/                   EXIT ;                                    /* 0x000000000000794d */
"""


def test_parse_nvdisasm_listing():
    instructions = sass.parse(NVDISASM)
    assert [i.address for i in instructions] == list(range(0, 0xE0, 0x10))
    first_branch = instructions[1]
    assert (first_branch.opcode, first_branch.predicate, first_branch.target) == ("BRA", "@!P0", 0x80)
    hgmma = instructions[5]
    assert (hgmma.mnemonic, hgmma.modifiers) == ("HGMMA", ("64x128x16", "F32"))
    assert hgmma.operands == "R24, gdesc[UR8].tnspB, R24"
    assert instructions[-1].target == 0xD0  # a branch to itself
    assert [i.category for i in instructions[:5]] == ["move", "control", "global load", "sync", "integer"]


def test_parse_cuobjdump_listing():
    instructions = sass.parse(CUOBJDUMP)
    assert [i.opcode for i in instructions] == ["IMAD.MOV.U32", "HMMA.16816.F32", "HMMA.1688.F32.TF32", "LDG.E.U16",
                                                "BRA", "LDGSTS.E.64", "EXIT"]
    assert instructions[4].target == 0x10 and instructions[4].predicate == "@P0"


def test_the_mma_loop_is_the_innermost_back_edge_around_the_mma_not_a_retry_after_exit():
    instructions = sass.parse(NVDISASM)
    # three backward branches: the loop (0x70 -> 0x20), the retry after EXIT (0xc0 -> 0x50: shorter, with
    # MMAs, but its body holds the EXIT) and a self-loop with none
    assert [(loop.start, loop.end) for loop in sass.loops(instructions)] == [(0x20, 0x70), (0x50, 0xC0), (0xD0, 0xD0)]
    loop = sass.mma_loop(instructions)
    assert (loop.start, loop.end, len(loop.instructions), len(loop.mma)) == (0x20, 0x70, 6, 2)
    assert sass.counts(loop.instructions, "category") == {"mma": 2, "global load": 1, "sync": 1, "integer": 1,
                                                         "control": 1}
    assert sass.mma_loop(sass.parse(CUOBJDUMP)).start == 0x10
    assert sass.mma_loop(instructions[6:]) is None  # no loop holds an MMA


def test_mma_shapes_and_input_types():
    shapes = [sass.mma_shape(i) for i in sass.parse(NVDISASM)[5:7] + sass.parse(CUOBJDUMP)[1:3]]
    assert [str(shape) for shape in shapes] == ["m64n128k16 fp16", "m64n128k16 bf16", "m16n8k16 fp16", "m16n8k8 tf32"]
    assert [shape.fmas for shape in shapes] == [131072, 131072, 2048, 1024]
    assert sass.mma_shape(sass.Instruction(0, "IADD3")) is None
    assert sass.mma_shapes(sass.parse(NVDISASM)) == {"HGMMA.64x128x16.F32": 1, "HGMMA.64x128x16.F32.BF16": 1}


def test_global_load_paths_and_widths():
    assert sass.global_loads(sass.parse(NVDISASM)) == {"LDGSTS.128": 1, "LDG.32": 1, "UTMALDG.2D": 1}
    assert sass.global_loads(sass.parse(CUOBJDUMP)) == {"LDG.16": 1, "LDGSTS.64": 1}
    assert sass.global_load(sass.Instruction(0, "LDG.E.64.CONSTANT")) == "LDG.64"
    assert sass.global_load(sass.Instruction(0, "STG.E.128")) is None


def test_uniform_datapath_instructions_count_as_their_vector_twins():
    assert sass.Instruction(0, "UIADD3").category == "integer"
    assert sass.Instruction(0, "ULDC.64").category == "move"
    assert sass.Instruction(0, "UTMALDG.2D").category == "global load"
    assert sass.Instruction(0, "QSPC.E.S").category == "other"
