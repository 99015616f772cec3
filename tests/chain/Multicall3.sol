// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.30;

/// @title The part of Multicall3's interface the x402 facilitator uses, written for the tests.
/// @notice Base Sepolia has Multicall3 at 0xcA11bde05977b3631167028862bE2a173976CA11; a bare
/// anvil has nothing there. The x402 EVM facilitator reads `balanceOf`, `name`, `version` and
/// `authorizationState` through `tryAggregate` to explain why a simulated
/// `transferWithAuthorization` reverted (`invalid_exact_evm_insufficient_balance`,
/// `..._nonce_already_used`, ...). Without a contract there it answers only the generic
/// `invalid_exact_evm_transaction_simulation_failed`. The tests install this runtime code at
/// that address with `anvil_setCode`, so the dev chain explains failures as Base Sepolia does.
contract Multicall3 {
    struct Call {
        address target;
        bytes callData;
    }

    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function aggregate(Call[] calldata calls) external payable returns (uint256 blockNumber, bytes[] memory returnData) {
        blockNumber = block.number;
        returnData = new bytes[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool success, bytes memory ret) = calls[i].target.call(calls[i].callData);
            require(success, "Multicall3: call failed");
            returnData[i] = ret;
        }
    }

    function tryAggregate(bool requireSuccess, Call[] calldata calls)
        public
        payable
        returns (Result[] memory returnData)
    {
        returnData = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool success, bytes memory ret) = calls[i].target.call(calls[i].callData);
            if (requireSuccess) require(success, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }

    function aggregate3(Call3[] calldata calls) external payable returns (Result[] memory returnData) {
        returnData = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool success, bytes memory ret) = calls[i].target.call(calls[i].callData);
            require(success || calls[i].allowFailure, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }

    function getBlockNumber() external view returns (uint256) {
        return block.number;
    }

    function getCurrentBlockTimestamp() external view returns (uint256) {
        return block.timestamp;
    }

    function getChainId() external view returns (uint256) {
        return block.chainid;
    }

    function getEthBalance(address addr) external view returns (uint256) {
        return addr.balance;
    }
}
